"""What a model family looks like to the engine: shapes, switches and weight names.

One shared decoder (``model.py``) runs every supported family; a family module
only says how its ``config.json`` and tensor names map onto this description,
so the three near-identical forwards are written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertNames:
    """Where a family keeps its MoE weights (relative to ``model.layers.{i}.``)."""

    block: str  # "mlp" or "block_sparse_moe"
    gate: str  # per-expert gate projection name ("gate_proj" / "w1")
    up: str  # ("up_proj" / "w3")
    down: str  # ("down_proj" / "w2")


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rotary
    qkv_bias: bool
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    dense_intermediate_size: int  # layers outside ``moe_layers`` use a dense MLP of this width
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    # transformers casts Qwen's top-k weights to the model dtype before scaling expert outputs;
    # Mixtral keeps them in fp32. Matching this keeps bf16 outputs close to the reference.
    router_weights_fp32: bool
    shared_expert_intermediate_size: int  # 0: no shared expert (Qwen2-MoE has one, with a sigmoid gate)
    expert_names: ExpertNames

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rope_theta_of(cfg: dict) -> float:
    """Only plain RoPE is implemented; a scaled variant must fail loudly, not drift silently."""
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"rope type {rope_type!r} / rope_scaling is not supported by the built-in engine (only default RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def head_dim_of(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def common_fields(cfg: dict) -> dict:
    """Fields every supported family spells the same way."""
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported by the built-in engine")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=head_dim_of(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta_of(cfg),
        max_positions=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        top_k=int(cfg["num_experts_per_tok"]),
    )
