"""Read an HF checkpoint (``config.json`` + safetensors) into the engine's fused layout.

Per-expert hub tensors are stacked at load into ``gate_up [E, 2I, H]`` and
``down [E, H, I]`` so the expert compute is one grouped GEMM (or one loop) per
layer; q/k/v are fused into one projection. transformers' own fused expert
layout (``experts.gate_up_proj``) is read as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from rollout.engine.models import arch_from_config
from rollout.engine.models.arch import ModelArch
from rollout.moe_spec import read_config


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, H]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # [E, H]; None on dense layers
    gate_up: torch.Tensor  # MoE [E, 2I, H] or dense [2I, H]
    down: torch.Tensor  # MoE [E, H, I] or dense [H, I]
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class ModelWeights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LayerWeights]


class _Tensors:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {str(model_dir)!r}")
        self._where: dict[str, object] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        return self._where[name].get_tensor(name)  # type: ignore[attr-defined]


def load_weights(model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> tuple[ModelArch, ModelWeights]:
    model_dir = Path(model_dir)
    arch = arch_from_config(read_config(model_dir))
    t = _Tensors(model_dir)

    def get(name: str) -> torch.Tensor:
        return t.get(name).to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return get(name) if name in t else None

    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv = torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"])
        bias = None
        if arch.qkv_bias:
            bias = torch.cat([get(attn + f"{x}_proj.bias") for x in "qkv"])
        if i in arch.moe_layers:
            mlp = _load_moe(t, get, p, arch)
        else:
            mlp = dict(
                router=None,
                gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                down=get(p + "mlp.down_proj.weight"),
            )
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                post_norm=get(p + "post_attention_layernorm.weight"),
                qkv=qkv,
                qkv_bias=bias,
                o=get(attn + "o_proj.weight"),
                q_norm=get(attn + "q_norm.weight") if arch.qk_norm else None,
                k_norm=get(attn + "k_norm.weight") if arch.qk_norm else None,
                **mlp,
            )
        )
    embed = get("model.embed_tokens.weight")
    lm_head = maybe("lm_head.weight")
    if lm_head is None:
        if not arch.tie_word_embeddings:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        lm_head = embed
    return arch, ModelWeights(embed=embed, final_norm=get("model.norm.weight"), lm_head=lm_head, layers=layers)


def _load_moe(t: _Tensors, get, prefix: str, arch: ModelArch) -> dict:
    names = arch.expert_names
    block = prefix + names.block + "."
    experts = block + "experts."
    if experts + "gate_up_proj" in t:  # transformers' fused layout
        gate_up, down = get(experts + "gate_up_proj"), get(experts + "down_proj")
    else:
        gate_up = torch.stack(
            [
                torch.cat([get(f"{experts}{e}.{names.gate}.weight"), get(f"{experts}{e}.{names.up}.weight")])
                for e in range(arch.num_experts)
            ]
        )
        down = torch.stack([get(f"{experts}{e}.{names.down}.weight") for e in range(arch.num_experts)])
    out = dict(router=get(block + "gate.weight"), gate_up=gate_up, down=down)
    if arch.shared_expert_intermediate_size:
        shared = block + "shared_expert."
        out.update(
            shared_gate_up=torch.cat([get(shared + "gate_proj.weight"), get(shared + "up_proj.weight")]),
            shared_down=get(shared + "down_proj.weight"),
            shared_gate=get(block + "shared_expert_gate.weight"),
        )
    return out
