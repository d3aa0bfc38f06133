"""Skip a verl test module, with a reason that names the missing package, when verl's stack is not installed.

verl is an optional extra: CI installs it (``scripts/test.sh``), the GPU machine may have
verl without hydra. A module-level import that fails would stop pytest at collection for
every test (``pytest -m gpu`` included); this turns it into a skip that says what is missing,
which ``.ci/run``'s strict skip policy then reports as a failure on CPU CI.
"""

from __future__ import annotations

import importlib

import pytest

_OWN_PACKAGES = ("rollout", "trainer_bridge", "recipes")
HOW_TO_INSTALL = "pip install --no-deps verl==0.9.1 && pip install -r trainer_bridge/verl/requirements-ci.txt"


def require(*modules: str) -> None:
    """Import ``modules`` or skip the calling test module; a broken import of this project's own code still fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or name
            if missing.split(".")[0] in _OWN_PACKAGES:
                raise
            needed_by = "" if missing == name else f" (needed by {name})"
            pytest.skip(
                f"{missing} is not installed{needed_by}; the verl tests need verl 0.9.x and its CI requirements: "
                f"{HOW_TO_INSTALL}",
                allow_module_level=True,
            )
