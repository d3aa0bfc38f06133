"""The decoder forward over flat (varlen) tokens, writing KV into the slot pool.

One function runs every supported family; ``ModelArch`` switches the few parts that
differ (q/k norm, q/k/v bias, shared expert, dense layers). Attention is a pluggable
callable ``(q, k_pool_layer, v_pool_layer, meta) -> out`` so a paged-decode kernel can
replace the torch path on CUDA.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from rollout.engine.models.layers import (
    AttentionMetadata,
    Rotary,
    dense_mlp,
    experts_forward,
    rms_norm,
    route_topk,
    torch_attention,
)
from rollout.engine.models.loader import LayerWeights, load_weights

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
RecordFn = Callable[[int, torch.Tensor], None]


class MoEModel:
    def __init__(
        self, model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype, max_positions: int,
        decode_attention: AttentionFn | None = None,
    ) -> None:
        self.arch, self.weights = load_weights(model_dir, device, dtype)
        self.device, self.dtype = device, dtype
        self.rotary = Rotary(self.arch.head_dim, self.arch.rope_theta, max_positions, device)
        self.moe_index = {layer: i for i, layer in enumerate(self.arch.moe_layers)}
        self.attention: AttentionFn = torch_attention
        self.decode_attention: AttentionFn = decode_attention or torch_attention

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
        a = self.arch
        h = self.weights.embed[input_ids]
        for i, w in enumerate(self.weights.layers):
            attn = self._attention(rms_norm(h, w.input_norm, a.rms_norm_eps), w, positions, out_cache_loc, meta, k_pool[i], v_pool[i])
            h = h + F.linear(attn, w.o)
            x = rms_norm(h, w.post_norm, a.rms_norm_eps)
            h = h + self._mlp(x, w, i, record)
        return rms_norm(h, self.weights.final_norm, a.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights.lm_head).float()

    def _attention(self, x, w: LayerWeights, positions, out_cache_loc, meta, k_pool, v_pool) -> torch.Tensor:
        a = self.arch
        n = x.shape[0]
        q, k, v = F.linear(x, w.qkv, w.qkv_bias).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
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
        top_ids, top_w = route_topk(x, w.router, a.top_k, a.norm_topk_prob, a.router_weights_fp32)
        if record is not None:
            record(self.moe_index[layer], top_ids)
        out = experts_forward(x, top_ids, top_w, w.gate_up, w.down)
        if w.shared_gate_up is not None:
            out = out + torch.sigmoid(F.linear(x, w.shared_gate)) * dense_mlp(x, w.shared_gate_up, w.shared_down)
        return out
