"""verl 0.9.1 with SGLang 0.5.16+: where verl looks for SGLang's routed-experts decoder.

verl 0.9.1 (pinned to SGLang 0.5.12) reads ``routed_experts`` from SGLang's reply in
``SGLangHttpServer.generate`` in one of two ways, and both break on SGLang 0.5.17:

* ``rollout.skip_tokenizer_init=True`` (verl's default): it calls ``.numpy()`` on
  ``meta_info["routed_experts"]``, but SGLang 0.5.17's tokenizer manager turns the
  tensor into a base64 string before it gets there (``AttributeError``). Nothing
  outside verl's method can change that, so the launch sets ``skip_tokenizer_init=False``
  and ships a tokenizer with the checkpoint (``bench/verl_e2e``).
* ``skip_tokenizer_init=False``: it imports ``extract_routed_experts_from_meta_info``
  from ``sglang.srt.layers.moe.routed_experts_capturer``, which SGLang moved to
  ``sglang.srt.state_capturer.routed_experts`` (same function: base64 int32 -> flat
  array). :func:`install` makes the old name import the new module, only when the old
  one no longer exists, without importing SGLang itself.

The plugin installs this in every process that imports it, which includes verl's
SGLang server actor: it builds an ``HFModelConfig``, whose ``external_lib`` is the plugin.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

# (the name verl 0.9.1 imports, where SGLang 0.5.16+ keeps it)
MOVED_MODULES = {
    "sglang.srt.layers.moe.routed_experts_capturer": "sglang.srt.state_capturer.routed_experts",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed by its own import."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: reached only when no regular finder has the old name."""

    def __init__(self, moved: dict[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = self.moved.get(fullname)
        if new is None:
            return None
        try:
            if importlib.util.find_spec(new) is None:
                return None
        except ModuleNotFoundError:  # the new module's package is missing too: the old name stays unresolved
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install(moved: dict[str, str] = MOVED_MODULES) -> None:
    """Append the finder once; importing the old names is then the new modules (if those exist)."""
    if not any(isinstance(f, MovedModuleFinder) and f.moved == moved for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder(moved))
