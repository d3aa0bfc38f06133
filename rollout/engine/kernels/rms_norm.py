"""Residual add + RMSNorm in one pass over the row.

The torch form (``layers.rms_norm``) is seven kernels per call (cast, square, mean, add,
rsqrt, scale, cast-and-weight) and the residual add one more; a decode step of
``bench-qwen3-moe`` makes 25 such calls, about 200 launches whose work is a few KB each. Here
it is one kernel per call, with the same rounding points as the torch form: the sum
``residual + x`` is rounded to the input dtype, normalised in fp32, rounded again, then
scaled by the weight.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch norm
    triton = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x) * weight, residual + x)``; without ``residual``, ``(rms_norm(x) * weight, x)``.

    ``x`` (and ``residual``) ``[..., H]`` with contiguous rows, ``weight`` ``[H]``.
    """
    if triton is None:
        raise RuntimeError("rms_norm needs triton")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"want x [..., H], weight [H] and residual like x; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if residual is None else tuple(residual.shape)}")
    rows = x.reshape(-1, hidden).contiguous()  # out and the sum are written with the same row stride
    res = residual.reshape(-1, hidden).contiguous() if residual is not None else rows
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if residual is not None else rows
    n = rows.shape[0]
    if n:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(n,)](rows, res, weight, out, summed, hidden, rows.stride(0), res.stride(0), eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape), summed.view(x.shape)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, hidden, stride_x, stride_r, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < hidden
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like a torch add
            tl.store(sum_ptr + row * stride_x + offs, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
        normed = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_x + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)
