"""Model presets: HF-format MoE checkpoints made locally from a config and a seed.

Nothing is ever downloaded. Tiny presets keep CPU tests in seconds;
``bench-qwen3-moe`` has the layer shapes of Qwen3-30B-A3B with 12 layers
(about 8.1B parameters) for GPU benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollout.atomic import atomic_dir

# No special tokens: every API takes token ids, and OLMoE's default eos id lies outside a tiny vocab.
_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

_TINY_ATTN = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    initializer_range=0.02, **_NO_SPECIAL_TOKENS,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen3-moe": dict(
        model_type="qwen3_moe", num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], **_TINY_ATTN,
    ),
    # Qwen2-MoE: shared expert with its sigmoid gate, and a dense first layer so routes skip it.
    "tiny-qwen2-moe": dict(
        model_type="qwen2_moe", num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[0], qkv_bias=True,
        **{k: v for k, v in _TINY_ATTN.items() if k != "head_dim"},
    ),
    "tiny-mixtral": dict(
        model_type="mixtral", num_hidden_layers=4, intermediate_size=32, num_local_experts=8,
        num_experts_per_tok=2, **{k: v for k, v in _TINY_ATTN.items() if k != "head_dim"},
    ),
    # OLMoE: softmax then top-k with no renormalisation.
    "tiny-olmoe": dict(
        model_type="olmoe", num_hidden_layers=4, intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, **{k: v for k, v in _TINY_ATTN.items() if k != "head_dim"},
    ),
    # DeepSeek-V3: sigmoid scores, selection-only bias, group-limited top-k, one dense first layer.
    "tiny-deepseek-v3": dict(
        model_type="deepseek_v3", num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        num_attention_heads=4, num_key_value_heads=4, hidden_size=64, vocab_size=512,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        **_NO_SPECIAL_TOKENS,
    ),
    "tiny-glm4-moe": dict(
        model_type="glm4_moe", num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        **_TINY_ATTN,
    ),
    "tiny-gpt-oss": dict(
        model_type="gpt_oss", num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_TINY_ATTN,
    ),
    # Qwen3-30B-A3B layer shapes, 12 layers: ~8.1B parameters.
    "bench-qwen3-moe": dict(
        model_type="qwen3_moe", num_hidden_layers=12, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **_NO_SPECIAL_TOKENS,
    ),
}

CHECKPOINT_FILE_MODE = 0o644
# Families the built-in engine runs; the others exist for trainer_bridge tests.
ENGINE_PRESETS = ("tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral")


def make_config(preset: str) -> Any:
    """The transformers config of a preset."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def init_model(
    preset: str,
    out: str | os.PathLike,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> Path:
    """Write ``config.json`` + safetensors with random weights drawn from ``seed``.

    The directory appears atomically: an interrupted call leaves nothing at ``out``.
    Weights are saved in the hub layout (one tensor per expert), which the
    built-in engine, transformers, SGLang and vLLM all load.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(preset)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return save_checkpoint(model, out)


def save_checkpoint(model: Any, out: str | os.PathLike) -> Path:
    """``save_pretrained`` into a scratch directory that replaces ``out`` in one rename.

    transformers writes ``*.safetensors`` with mode 0600 (through a private temporary
    file) but ``config.json`` with 0644; every file gets the ordinary 0644 here, so a
    checkpoint made by one user can be served or trained on by another.
    """
    model.generation_config.pad_token_id = None
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(CHECKPOINT_FILE_MODE)
    return out

