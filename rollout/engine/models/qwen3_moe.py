"""Qwen3-MoE: per-head q/k RMSNorm, softmax -> top-k (-> renormalise if ``norm_topk_prob``)."""

from __future__ import annotations

from rollout.engine.models.arch import ExpertNames, ModelArch, common_fields
from rollout.moe_spec import MoESpec


def arch(cfg: dict) -> ModelArch:
    spec = MoESpec.from_config(cfg)
    if cfg.get("attention_bias"):
        raise ValueError("qwen3_moe with attention_bias=True is not supported by the built-in engine")
    return ModelArch(
        **common_fields(cfg),
        qk_norm=True,
        qkv_bias=False,
        moe_layers=spec.moe_layers,
        num_experts=spec.num_experts,
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        dense_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        router_weights_fp32=False,
        shared_expert_intermediate_size=0,
        expert_names=ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    )
