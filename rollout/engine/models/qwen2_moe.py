"""Qwen2-MoE: q/k/v bias, a shared expert scaled by a sigmoid gate, optional dense layers."""

from __future__ import annotations

from rollout.engine.models.arch import ExpertNames, ModelArch, common_fields
from rollout.moe_spec import MoESpec


def arch(cfg: dict) -> ModelArch:
    spec = MoESpec.from_config(cfg)
    return ModelArch(
        **common_fields(cfg),
        qk_norm=False,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        moe_layers=spec.moe_layers,
        num_experts=spec.num_experts,
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        dense_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        router_weights_fp32=False,
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        expert_names=ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    )
