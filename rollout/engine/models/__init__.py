"""The engine's own forward: one decoder for every supported MoE family."""

from __future__ import annotations

from typing import Callable

from rollout.engine.models import mixtral, qwen2_moe, qwen3_moe
from rollout.engine.models.arch import ModelArch

FAMILIES: dict[str, Callable[[dict], ModelArch]] = {
    "qwen3_moe": qwen3_moe.arch,
    "qwen2_moe": qwen2_moe.arch,
    "mixtral": mixtral.arch,
}


def arch_from_config(cfg: dict) -> ModelArch:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"model family {family!r} is not supported by the built-in engine; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[family](cfg)
