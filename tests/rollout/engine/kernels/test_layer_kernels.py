"""The per-layer Triton kernels (residual + RMSNorm, q/k norm + RoPE + KV write, router top-k) against the torch ops."""

import pytest
import torch

pytest.importorskip("triton")

from rollout.engine.kernels.rms_norm import rms_norm as fused_rms_norm  # noqa: E402
from rollout.engine.kernels.rope_kv import rope_qk_store_kv  # noqa: E402
from rollout.engine.kernels.router_topk import router_topk  # noqa: E402
from rollout.engine.models.layers import Rotary, rms_norm, route_topk  # noqa: E402
from kernel_params import DEVICE  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 48, 2048])
def test_add_rms_norm_matches_torch(dtype, hidden):
    x, res = _randn(7, hidden, dtype=dtype), _randn(7, hidden, dtype=dtype, seed=1)
    weight = (1 + 0.1 * _randn(hidden, seed=2)).to(dtype)
    out, summed = fused_rms_norm(x, weight, 1e-6, res)
    ref_sum = res + x
    assert torch.equal(summed, ref_sum)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), rms_norm(ref_sum, weight, 1e-6).float(), atol=tol, rtol=tol)
    alone, same = fused_rms_norm(x, weight, 1e-6)
    assert same is x or torch.equal(same, x)
    assert torch.allclose(alone.float(), rms_norm(x, weight, 1e-6).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads", [(4, 2, 16), (6, 2, 24), (32, 4, 128)])
def test_rope_and_kv_write_match_torch(dtype, qk_norm, heads):
    hq, hkv, d = heads
    n, slots = 5, 20
    qkv = _randn(n, (hq + 2 * hkv) * d, dtype=dtype)
    q_norm = (1 + 0.1 * _randn(d, seed=3)).to(dtype) if qk_norm else None
    k_norm = (1 + 0.1 * _randn(d, seed=4)).to(dtype) if qk_norm else None
    rotary = Rotary(d, 10000.0, 64, torch.device(DEVICE))
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    loc = torch.tensor([2, 7, 1, 19, 11], device=DEVICE)
    k_pool = torch.full((slots, hkv, d), 7.0, dtype=dtype, device=DEVICE)
    v_pool = torch.full_like(k_pool, 7.0)
    q = rope_qk_store_kv(qkv, hq, hkv, d, q_norm, k_norm, 1e-6, rotary.cos, rotary.sin, positions, k_pool, v_pool, loc)

    rq, rk, rv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    rq, rk, rv = rq.view(n, hq, d), rk.view(n, hkv, d), rv.view(n, hkv, d)
    if qk_norm:
        rq, rk = rms_norm(rq, q_norm, 1e-6), rms_norm(rk, k_norm, 1e-6)
    rq, rk = rotary.apply(rq, rk, positions)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(q.float(), rq.float(), atol=tol, rtol=tol)
    assert torch.allclose(k_pool[loc].float(), rk.float(), atol=tol, rtol=tol)
    assert torch.equal(v_pool[loc], rv)
    untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
    untouched[loc] = False
    assert torch.all(k_pool[untouched] == 7) and torch.all(v_pool[untouched] == 7)  # only the step's slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k,renorm,fp32", [(8, 2, True, False), (128, 8, True, False), (6, 3, False, True)])
def test_router_topk_matches_torch(dtype, experts, top_k, renorm, fp32):
    x, router = _randn(37, 32, dtype=dtype), _randn(experts, 32, dtype=dtype, seed=5)
    ids, weights = router_topk(torch.nn.functional.linear(x, router), top_k, renorm, fp32)
    ref_ids, ref_w = route_topk(x, router, top_k, renorm, fp32)
    assert ids.dtype == torch.int32 and weights.dtype == ref_w.dtype
    assert torch.equal(ids.long(), ref_ids)  # random logits: no ties
    tol = 1e-6 if fp32 or dtype == torch.float32 else 1e-2
    assert torch.allclose(weights.float(), ref_w.float(), atol=tol, rtol=tol)


def test_router_ties_pick_the_lowest_expert():
    logits = torch.zeros(2, 8, device=DEVICE)
    logits[1, 5] = 1.0
    ids, weights = router_topk(logits, 3, renormalize=False, weights_fp32=True)
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1]]
    assert torch.allclose(weights[0], torch.full((3,), 1 / 8, device=DEVICE))
