"""From the fused qkv projection to attention inputs in one kernel: q/k RMSNorm, RoPE, K/V written to the pool.

In torch this is the split, two per-head norms (seven kernels each), the cos/sin gathers
and casts, two rotate-halves with their products and sums, and two index-puts into the
slot pool: about 30 launches per layer that each move a few KB at decode. One program
here handles one token: it reads the token's q, k and v once, writes q (normed and
rotated) to a contiguous ``[N, Hq, D]`` tensor and k (normed, rotated) and v straight
into their slots. Rounding follows the torch path (``layers``): the norm's output and the
cos/sin tables are rounded to the model dtype before the rotation, which is computed in
fp32 and rounded once.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch path
    triton = None


def rope_qk_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                     cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     k_pool: torch.Tensor, v_pool: torch.Tensor, out_cache_loc: torch.Tensor) -> torch.Tensor:
    """Returns q ``[N, Hq, D]``; writes ``k_pool[out_cache_loc]`` and ``v_pool[out_cache_loc]``.

    ``qkv`` ``[N, (Hq + 2 Hkv) D]`` (q heads, then k, then v), ``q_norm``/``k_norm`` ``[D]`` or both None,
    ``cos``/``sin`` ``[max_positions, D]`` fp32 (``cat(freqs, freqs)``), pools ``[slots, Hkv, D]``.
    """
    if triton is None:
        raise RuntimeError("rope_qk_store_kv needs triton")
    n = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_heads}+2x{num_kv_heads} heads of an even "
                         f"head_dim {head_dim}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together")
    if k_pool.shape[1:] != (num_kv_heads, head_dim) or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError(f"pools must be [slots, {num_kv_heads}, {head_dim}] with contiguous heads, got {tuple(k_pool.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if n:
        half = head_dim // 2
        _rope_kv_kernel[(n,)](
            qkv, q, k_pool, v_pool, q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv,
            cos, sin, positions, out_cache_loc, qkv.stride(0), cos.stride(0), k_pool.stride(0), k_pool.stride(1),
            v_pool.stride(0), v_pool.stride(1), eps,
            HQ=num_heads, HKV=num_kv_heads, HALF=half, QK_NORM=q_norm is not None,
            BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )
    return q


if triton is not None:

    @triton.jit
    def _rotated(x_ptr, rows, heads_ok, norm_ptr, cos1, sin1, cos2, sin2, eps,
                 HALF: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Load ``[heads, D]`` at ``x_ptr + rows * 2 HALF``, norm each head, rotate; fp32 halves (lo, hi)."""
        d = tl.arange(0, BLOCK_HALF)
        d_ok = d < HALF
        ok = heads_ok[:, None] & d_ok[None, :]
        base = x_ptr + rows[:, None] * (2 * HALF) + d[None, :]
        lo = tl.load(base, mask=ok, other=0.0)
        hi = tl.load(base + HALF, mask=ok, other=0.0)
        dtype = lo.dtype
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        if QK_NORM:
            inv = 1.0 / tl.sqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF) + eps)
            w_lo = tl.load(norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            w_hi = tl.load(norm_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
            lo = ((lo * inv[:, None]).to(dtype).to(tl.float32) * w_lo[None, :]).to(dtype).to(tl.float32)
            hi = ((hi * inv[:, None]).to(dtype).to(tl.float32) * w_hi[None, :]).to(dtype).to(tl.float32)
        # rotate_half: (lo, hi) -> (-hi, lo)
        return lo * cos1[None, :] - hi * sin1[None, :], hi * cos2[None, :] + lo * sin2[None, :]

    @triton.jit
    def _rope_kv_kernel(qkv_ptr, q_ptr, k_pool_ptr, v_pool_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr,
                        pos_ptr, loc_ptr, stride_t, stride_cos, stride_ks, stride_kh, stride_vs, stride_vh, eps,
                        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        slot = tl.load(loc_ptr + t).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        d_ok = d < HALF
        dtype = qkv_ptr.dtype.element_ty
        # the torch path casts the fp32 tables to the model dtype before multiplying
        cos1 = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * stride_cos + HALF + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
        row = qkv_ptr + t * stride_t

        hq = tl.arange(0, BLOCK_HQ)
        hq_ok = hq < HQ
        q_lo, q_hi = _rotated(row, hq, hq_ok, q_norm_ptr, cos1, sin1, cos2, sin2, eps, HALF, QK_NORM, BLOCK_HALF)
        q_out = q_ptr + t * (HQ * 2 * HALF) + hq[:, None] * (2 * HALF) + d[None, :]
        q_mask = hq_ok[:, None] & d_ok[None, :]
        tl.store(q_out, q_lo.to(dtype), mask=q_mask)
        tl.store(q_out + HALF, q_hi.to(dtype), mask=q_mask)

        hk = tl.arange(0, BLOCK_HKV)
        hk_ok = hk < HKV
        kv_mask = hk_ok[:, None] & d_ok[None, :]
        k_lo, k_hi = _rotated(row + HQ * 2 * HALF, hk, hk_ok, k_norm_ptr, cos1, sin1, cos2, sin2, eps, HALF, QK_NORM,
                              BLOCK_HALF)
        k_out = k_pool_ptr + slot * stride_ks + hk[:, None] * stride_kh + d[None, :]
        tl.store(k_out, k_lo.to(k_pool_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_out + HALF, k_hi.to(k_pool_ptr.dtype.element_ty), mask=kv_mask)

        v_in = row + (HQ + HKV) * 2 * HALF + hk[:, None] * (2 * HALF) + d[None, :]
        v_out = v_pool_ptr + slot * stride_vs + hk[:, None] * stride_vh + d[None, :]
        tl.store(v_out, tl.load(v_in, mask=kv_mask, other=0.0), mask=kv_mask)
        tl.store(v_out + HALF, tl.load(v_in + HALF, mask=kv_mask, other=0.0), mask=kv_mask)
