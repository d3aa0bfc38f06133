"""The decoder forward over flat (varlen) tokens, writing KV into the slot pool.

One function runs every supported family; ``ModelArch`` switches the few parts that
differ (q/k norm, q/k/v bias, shared expert, dense layers). Each op has a torch form
(``layers``) and, on the fast path, a Triton form (``rollout.engine.kernels``); ``Kernels``
picks one per op when the model is built, so the forward itself has no per-step choices.
The weights stay plain tensors in the loader's layout (``LayerWeights``): every kernel takes
their strides, so copying new values into them in place keeps working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rollout.engine.models.layers import (
    AttentionMetadata,
    Rotary,
    dense_mlp,
    experts_forward,
    experts_grouped_mm,
    rms_norm,
    route_topk,
    torch_attention,
    triton_decode_attention,
    triton_prefill_attention,
)
from rollout.engine.models.loader import LayerWeights, load_weights

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RecordFn = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Kernels:
    """Which implementation each op uses (the ``EngineConfig`` backend options, resolved)."""

    decode_attention: str = "torch"  # torch | triton
    prefill_attention: str = "torch"  # torch | triton
    moe: str = "torch"  # torch | grouped_mm | triton
    layer: str = "torch"  # torch | triton: residual + RMSNorm, q/k norm + RoPE + KV write, router top-k (and the sampler)


_ATTENTION: dict[str, tuple[AttentionFn, AttentionFn]] = {  # backend -> (decode, prefill)
    "torch": (torch_attention, torch_attention),
    "triton": (triton_decode_attention, triton_prefill_attention),
}


def _experts_fn(backend: str) -> ExpertsFn:
    if backend == "triton":  # imported only when chosen: CPU installs need not load triton
        from rollout.engine.kernels.fused_moe import fused_experts

        return fused_experts
    return {"torch": experts_forward, "grouped_mm": experts_grouped_mm}[backend]


class MoEModel:
    def __init__(
        self, model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype, max_positions: int,
        kernels: Kernels = Kernels(),
    ) -> None:
        self.arch, self.weights = load_weights(model_dir, device, dtype)
        self.device, self.dtype = device, dtype
        self.kernels = kernels
        self.rotary = Rotary(self.arch.head_dim, self.arch.rope_theta, max_positions, device)
        self.moe_index = {layer: i for i, layer in enumerate(self.arch.moe_layers)}
        self.decode_attention: AttentionFn = _ATTENTION[kernels.decode_attention][0]
        self.attention: AttentionFn = _ATTENTION[kernels.prefill_attention][1]
        self.experts: ExpertsFn = _experts_fn(kernels.moe)
        self._fused_layer_ops = kernels.layer == "triton"
        if self._fused_layer_ops:
            from rollout.engine.kernels.rms_norm import rms_norm as fused_rms_norm
            from rollout.engine.kernels.rope_kv import rope_qk_store_kv
            from rollout.engine.kernels.router_topk import router_topk

            self._fused_norm, self._rope_kv, self._router_topk = fused_rms_norm, rope_qk_store_kv, router_topk

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        out_cache_loc: torch.Tensor,
        meta: AttentionMetadata,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        record: RecordFn | None,
    ) -> torch.Tensor:
        """Final hidden states ``[N, H]``; each MoE layer hands its top-k ids to ``record``."""
        delta, residual = self.weights.embed[input_ids], None
        for i, w in enumerate(self.weights.layers):
            x, residual = self._add_norm(delta, residual, w.input_norm)
            attn = self._attention(x, w, positions, out_cache_loc, meta, k_pool[i], v_pool[i])
            x, residual = self._add_norm(F.linear(attn, w.o), residual, w.post_norm)
            delta = self._mlp(x, w, i, record)
        return self._add_norm(delta, residual, self.weights.final_norm)[0]

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, V]`` in the model dtype: the sampler reads bf16 logits directly (half the bytes of fp32).

        ``out``: write into this ``[N, V]`` buffer (the CUDA graphs share one instead of keeping one each).
        """
        if out is None:
            return F.linear(hidden, self.weights.lm_head)
        return torch.mm(hidden, self.weights.lm_head.t(), out=out)  # what F.linear runs, into the buffer

    def _add_norm(self, delta: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
        """``(rms_norm(residual + delta), residual + delta)``: the residual stream and the next op's input."""
        eps = self.arch.rms_norm_eps
        if self._fused_layer_ops:
            return self._fused_norm(delta, weight, eps, residual)
        h = delta if residual is None else residual + delta
        return rms_norm(h, weight, eps), h

    def _attention(self, x, w: LayerWeights, positions, out_cache_loc, meta, k_pool, v_pool) -> torch.Tensor:
        a = self.arch
        n = x.shape[0]
        qkv = F.linear(x, w.qkv, w.qkv_bias)
        if self._fused_layer_ops:
            q = self._rope_kv(qkv, a.num_heads, a.num_kv_heads, a.head_dim, w.q_norm, w.k_norm, a.rms_norm_eps,
                                 self.rotary.cos, self.rotary.sin, positions, k_pool, v_pool, out_cache_loc)
        else:
            q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
            q = q.view(n, a.num_heads, a.head_dim)
            k = k.view(n, a.num_kv_heads, a.head_dim)
            v = v.view(n, a.num_kv_heads, a.head_dim)
            if a.qk_norm:
                q = rms_norm(q, w.q_norm, a.rms_norm_eps)
                k = rms_norm(k, w.k_norm, a.rms_norm_eps)
            q, k = self.rotary.apply(q, k, positions)
            k_pool[out_cache_loc] = k
            v_pool[out_cache_loc] = v
        attend = self.decode_attention if meta.decode else self.attention
        return attend(q, k_pool, v_pool, meta).reshape(n, a.q_size)

    def _mlp(self, x: torch.Tensor, w: LayerWeights, layer: int, record: RecordFn | None) -> torch.Tensor:
        a = self.arch
        if w.router is None:
            return dense_mlp(x, w.gate_up, w.down)
        if self._fused_layer_ops:
            top_ids, top_w = self._router_topk(F.linear(x, w.router), a.top_k, a.norm_topk_prob, a.router_weights_fp32)
        else:
            top_ids, top_w = route_topk(x, w.router, a.top_k, a.norm_topk_prob, a.router_weights_fp32)
        if record is not None:
            record(self.moe_index[layer], top_ids)
        out = self.experts(x, top_ids, top_w, w.gate_up, w.down)
        if w.shared_gate_up is not None:
            out = out + torch.sigmoid(F.linear(x, w.shared_gate)) * dense_mlp(x, w.shared_gate_up, w.shared_down)
        return out
