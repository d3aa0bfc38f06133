"""R3 rollout side: generate with routed-experts capture, return compact routes.

Names are imported lazily so that ``from rollout import RoutedExperts`` does not
pull in torch or the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RoutedExperts": "rollout.routed_experts",
    "MoESpec": "rollout.moe_spec",
    "SamplingParams": "rollout.types",
    "Rollout": "rollout.types",
    "RolloutWorker": "rollout.worker",
    "save_rollouts": "rollout.rollout_file",
    "load_rollouts": "rollout.rollout_file",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
