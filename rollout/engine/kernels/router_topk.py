"""Router softmax, top-k and renormalisation in one kernel (``layers.route_topk``'s contract).

torch runs softmax, topk, sum, divide and a cast as five launches over ``[N, E]``; here one
program holds a block of tokens' logits, takes the softmax in fp32 and picks the top k by
repeated argmax (the lowest expert id wins a tie). Ids come back as int32, weights in fp32
or in the logits' dtype, as the family's reference does.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch router
    triton = None

BLOCK_T = 16  # tokens per program


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool, weights_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` ``[N, E]`` -> ids ``[N, K]`` int32 (descending weight) and weights ``[N, K]``."""
    if triton is None:
        raise RuntimeError("router_topk needs triton")
    n, num_experts = logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ids = torch.empty(n, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(n, top_k, dtype=torch.float32 if weights_fp32 else logits.dtype, device=logits.device)
    if n:
        _router_kernel[(triton.cdiv(n, BLOCK_T),)](
            logits, ids, weights, n, num_experts, logits.stride(0),
            TOP_K=top_k, RENORM=renormalize, BLOCK_T=BLOCK_T, BLOCK_E=triton.next_power_of_2(num_experts),
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return ids, weights


if triton is not None:

    @triton.jit(do_not_specialize=["n"])
    def _router_kernel(logits_ptr, ids_ptr, w_ptr, n, num_experts, stride_t, TOP_K: tl.constexpr,
                       RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < n
        e = tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        x = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_t + e[None, :],
                    mask=t_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)  # rows past n: harmless zeros
        x = tl.where(e_ok[None, :], x, float("-inf"))
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        k = tl.arange(0, BLOCK_K)
        top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        remaining = tl.where(e_ok[None, :], p, -1.0)
        for j in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=1)
            pick = tl.min(tl.where(remaining == best[:, None], e[None, :], BLOCK_E), axis=1)  # lowest id of a tie
            top_w = tl.where(k[None, :] == j, best[:, None], top_w)
            top_i = tl.where(k[None, :] == j, pick[:, None], top_i)
            remaining = tl.where(e[None, :] == pick[:, None], -1.0, remaining)
        if RENORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        out = t[:, None].to(tl.int64) * TOP_K + k[None, :]
        mask = t_ok[:, None] & (k[None, :] < TOP_K)
        tl.store(ids_ptr + out, top_i, mask=mask)
        tl.store(w_ptr + out, top_w.to(w_ptr.dtype.element_ty), mask=mask)
