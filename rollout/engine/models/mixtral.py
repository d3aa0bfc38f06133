"""Mixtral: every layer MoE; softmax over all experts, top-k, renormalised (= softmax over the k logits)."""

from __future__ import annotations

from rollout.engine.models.arch import ExpertNames, ModelArch, common_fields
from rollout.moe_spec import MoESpec


def arch(cfg: dict) -> ModelArch:
    spec = MoESpec.from_config(cfg)
    if cfg.get("sliding_window") is not None:
        raise ValueError("mixtral with sliding_window set is not supported by the built-in engine")
    return ModelArch(
        **common_fields(cfg),
        qk_norm=False,
        qkv_bias=False,
        moe_layers=spec.moe_layers,
        num_experts=spec.num_experts,
        moe_intermediate_size=int(cfg["intermediate_size"]),
        dense_intermediate_size=0,
        norm_topk_prob=True,
        router_weights_fp32=True,
        shared_expert_intermediate_size=0,
        expert_names=ExpertNames(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
    )
