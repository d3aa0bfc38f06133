"""Progress bars of the ``r3`` commands, and the one switch that silences them all.

Bars are tqdm on stderr, so stdout keeps only results. transformers draws its own
("Loading weights", "Writing model shards") through its logging module; ``--no-progress``
must silence those too, so commands that load or save with transformers run inside
:func:`library_bars`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from tqdm import tqdm


def bar(desc: str, total: int, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' bars off inside the block when ``enabled`` is false (as they were, afterwards)."""
    if enabled:
        yield
        return
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
