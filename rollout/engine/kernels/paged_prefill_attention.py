"""Causal attention for prefill (extend) steps, reading K/V in place from the slot pool.

The torch path pads every chunk's queries to ``[B, max_q]``, gathers each sequence's whole
context into a padded ``[B, max_kv, Hkv, D]`` copy and builds a ``[B, max_q, max_kv]`` mask:
memory that grows with the square of the prompt, and SDPA with an explicit mask falls back
to its non-flash kernels. This kernel takes the flat (varlen) queries, and each program
runs a flash-attention loop (online softmax) for one block of one sequence's queries and
one query head, over that sequence's slots read through the request table. Chunked
prefill and prefix-cache hits need nothing special: a chunk's queries sit at positions
``kv_len - q_len .. kv_len - 1`` and see every earlier slot of their row.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

MIN_DOT = 16


def paged_prefill_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_slot: torch.Tensor,
                                table_rows: torch.Tensor, q_starts: torch.Tensor, kv_lens: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Per-sequence fp32 softmax over the gathered context: the correctness bar for the kernel (host loop)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k_pool.shape[1]
    out = torch.empty_like(q)
    starts = q_starts.tolist()
    for b, (row, kv_len) in enumerate(zip(table_rows.tolist(), kv_lens.tolist())):
        lo, hi = starts[b], starts[b + 1]
        slots = req_to_slot[row, :kv_len].long()
        keys = k_pool[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q[lo:hi].float(), keys) * scale
        q_pos = torch.arange(kv_len - (hi - lo), kv_len, device=q.device)
        scores = scores.masked_fill(torch.arange(kv_len, device=q.device)[None, None, :] > q_pos[None, :, None],
                                    float("-inf"))
        out[lo:hi] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_slot: torch.Tensor,
                            table_rows: torch.Tensor, q_starts: torch.Tensor, kv_lens: torch.Tensor, max_q: int,
                            scale: float | None = None, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Causal attention of ``B`` sequences' new tokens over their whole context.

    Args:
        q: ``[N, Hq, D]``, sequence ``b``'s new tokens at rows ``q_starts[b] .. q_starts[b + 1] - 1`` (after RoPE;
            their K/V already written to the pool).
        k_pool, v_pool: one layer's pool ``[slots, Hkv, D]``.
        req_to_slot: ``[R, max_context]`` request table; ``table_rows`` ``[B]`` each sequence's row.
        q_starts: ``[B + 1]`` int; ``kv_lens``: ``[B]`` context length after this step (the new tokens included).
        max_q: the longest chunk, host-known (sizes the grid; nothing is read back from the device).
        block_m, block_n: query and key block sizes; None: 64 (32 for float32, whose tiles take twice the memory).
    """
    if triton is None:
        raise RuntimeError("paged_prefill_attention needs triton")
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    batch = table_rows.shape[0]
    if k_pool.shape[2] != head_dim or num_q_heads % num_kv_heads or v_pool.shape != k_pool.shape:
        raise ValueError(f"want q [N, Hq, D] and pools [slots, Hkv, D] with Hkv | Hq; got {tuple(q.shape)}, "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if q_starts.shape != (batch + 1,) or kv_lens.shape != (batch,):
        raise ValueError(f"want q_starts [B + 1] and kv_lens [B] for B={batch}; got {tuple(q_starts.shape)}, "
                         f"{tuple(kv_lens.shape)}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous head_dim")
    out = torch.empty_like(q)
    if n == 0 or batch == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    default = 32 if q.dtype == torch.float32 else 64
    block_m = max(MIN_DOT, min(block_m or default, triton.next_power_of_2(max_q)))
    block_n = block_n or default
    grid = (triton.cdiv(max_q, block_m), batch, num_q_heads)
    _prefill_kernel[grid](
        q, k_pool, v_pool, req_to_slot, table_rows, q_starts, kv_lens, out,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        req_to_slot.stride(0), out.stride(0), out.stride(1), scale * math.log2(math.e),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if head_dim <= 64 else 8, num_stages=2,
    )
    return out


if triton is not None:

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, table_ptr, rows_ptr, starts_ptr, lens_ptr, out_ptr,
                        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
                        stride_ot, stride_oh, scale_log2,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(starts_ptr + seq).to(tl.int32)
        q_len = tl.load(starts_ptr + seq + 1).to(tl.int32) - q_start
        if m_block * BLOCK_M >= q_len:
            return
        kv_len = tl.load(lens_ptr + seq).to(tl.int32)
        row = tl.load(rows_ptr + seq).to(tl.int64)
        kv_head = head // GROUP
        prefix = kv_len - q_len
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        q_pos = prefix + offs_m
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        tokens = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # causal: this block's last query sees positions up to prefix + its index
        kv_end = tl.minimum(kv_len, prefix + (m_block + 1) * BLOCK_M)
        for start in range(0, kv_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            slots = tl.load(table_ptr + row * stride_tb + n, mask=n_ok, other=0).to(tl.int64)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale_log2
            visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # rows with nothing visible yet keep -inf: subtract 0 there, so exp2 gives 0, never NaN
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp2(running_max - safe_max)
            probs = tl.exp2(scores - safe_max[:, None])
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            running_max = new_max
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
