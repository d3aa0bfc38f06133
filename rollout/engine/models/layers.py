"""The forward's building blocks as plain functions over tensors.

Each mirrors the reference (transformers) op order and dtypes so fp32 logits agree
to ~1e-6 and bf16 rounding happens at the same places. Routing and the expert
compute are separate functions: replay, capture and the expert kernels each touch
exactly one of them. The Triton versions live in ``rollout.engine.kernels``; the model
(``model.py``) picks one implementation of each op when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# torch >= 2.10 names it F.grouped_mm; 2.9 only has the private op. Needs SM80+ on CUDA.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, scale in the input dtype (as transformers' Qwen/Mixtral RMSNorm)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class Rotary:
    """cos/sin tables for every position, computed once in fp32 and indexed per token."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[N, Hq, D]``, ``k`` ``[N, Hkv, D]``, ``positions`` ``[N]``."""
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class AttentionMetadata:
    """Per-step tensors every layer's attention shares (built once per forward).

    The torch path pads queries to ``[B, max_q]`` and gathers each sequence's keys
    through the request->slot table; the paged kernels instead use
    ``seq_rows``/``kv_lens``/``req_to_slot`` (and ``q_starts`` for prefill) directly.
    """

    # torch path only (None where only the paged kernels run, e.g. inside a decode CUDA graph)
    kv_slots: torch.Tensor | None  # [B, max_kv] KV slot of each context position
    mask: torch.Tensor | None  # [B, 1, max_q, max_kv] True where the query may attend
    pad_index: torch.Tensor | None  # [B, max_q] flat token index, N for padding
    unpad_index: torch.Tensor | None  # [N] position of each token in the flattened [B * max_q]
    # every path
    seq_rows: torch.Tensor  # [B] request-table rows
    kv_lens: torch.Tensor  # [B] context length after this step
    req_to_slot: torch.Tensor  # the whole request->slot table, for kernels that read it in place
    decode: bool  # every sequence feeds exactly one token (host-known)
    q_starts: torch.Tensor | None = None  # [B + 1] flat index of each sequence's first token (prefill kernel)
    max_q: int = 1  # the longest chunk (host-known; sizes the prefill kernel's grid)


def torch_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Causal attention of ``q`` ``[N, Hq, D]`` over one layer's pool ``[slots, Hkv, D]``."""
    n, hq, d = q.shape
    q_pad = torch.cat([q, q.new_zeros(1, hq, d)])[meta.pad_index]  # [B, max_q, Hq, D]
    keys = k_pool[meta.kv_slots]  # [B, max_kv, Hkv, D]
    values = v_pool[meta.kv_slots]
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask, enable_gqa=True
    )  # [B, Hq, max_q, D]
    return out.transpose(1, 2).reshape(-1, hq, d)[meta.unpad_index]


def triton_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Decode attention with the paged Triton kernel: K/V read in place through the request table."""
    from rollout.engine.kernels.paged_decode_attention import paged_decode_attention

    return paged_decode_attention(q, k_pool, v_pool, meta.req_to_slot, meta.kv_lens, table_rows=meta.seq_rows)


def triton_prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Causal varlen attention of a prefill step with the paged Triton kernel (no padding, no gather)."""
    from rollout.engine.kernels.paged_prefill_attention import paged_prefill_attention

    if meta.q_starts is None:
        raise ValueError("the paged prefill kernel needs AttentionMetadata.q_starts")
    return paged_prefill_attention(q, k_pool, v_pool, meta.req_to_slot, meta.seq_rows, meta.q_starts, meta.kv_lens,
                                   meta.max_q)


def route_topk(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool, weights_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k; ids ``[N, K]`` int64 and weights ``[N, K]``."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_ids, top_w if weights_fp32 else top_w.to(logits.dtype)


def experts_forward(
    x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts: ``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]``; one GEMM pair per expert.

    The reference (and the CPU path). Its host loop reads the expert counts back, which on
    CUDA synchronises every MoE layer (``moe_backend='grouped_mm'`` or ``'triton'`` do not).
    Contributions are summed per token in a fixed order (no atomics), so results do not
    depend on which other tokens share the batch.
    """
    n, k = top_ids.shape
    rows, order, ends = _sorted_by_expert(x, top_ids, gate_up.shape[0])
    out_sorted = torch.empty_like(rows)
    begin = 0
    for e, end in enumerate(ends.tolist()):
        if end > begin:
            gate, up = F.linear(rows[begin:end], gate_up[e]).chunk(2, dim=-1)
            out_sorted[begin:end] = F.linear(F.silu(gate) * up, down[e])
        begin = end
    return _weighted_sum(out_sorted, order, top_w, n, k, x.dtype)


def experts_grouped_mm(
    x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``experts_forward`` as two ``torch._grouped_mm`` calls (CUDA, bfloat16), with no host sync."""
    if _grouped_mm is None:
        raise RuntimeError("this torch has no grouped_mm (needs torch >= 2.9)")
    n, k = top_ids.shape
    rows, order, ends = _sorted_by_expert(x, top_ids, gate_up.shape[0])
    offsets = ends.to(torch.int32)
    gate, up = _grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out_sorted = _grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    return _weighted_sum(out_sorted, order, top_w, n, k, x.dtype)


def _sorted_by_expert(x: torch.Tensor, top_ids: torch.Tensor, num_experts: int):
    """Token rows in expert order, the order, and the end of each expert's run (searchsorted: no host sync)."""
    k = top_ids.shape[1]
    sorted_ids, order = torch.sort(top_ids.reshape(-1), stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=x.device, dtype=sorted_ids.dtype), right=True)
    return x[order // k], order, ends


def _weighted_sum(out_sorted: torch.Tensor, order: torch.Tensor, top_w: torch.Tensor, n: int, k: int,
                  dtype: torch.dtype) -> torch.Tensor:
    per_choice = torch.empty_like(out_sorted)
    per_choice[order] = out_sorted
    weighted = per_choice.view(n, k, -1) * top_w.unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


def dense_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)
