"""The paged prefill (extend) attention kernel against its reference, and the reference against causal SDPA."""

import pytest
import torch

pytest.importorskip("triton")

from rollout.engine.kernels.paged_prefill_attention import (  # noqa: E402
    paged_prefill_attention, paged_prefill_attention_ref,
)
from kernel_params import DEVICE, BF16  # noqa: E402


def _case(q_lens, kv_lens, hq, hkv, d, dtype, seed=0):
    """Sequences whose slots are scattered over the pool, with a request table wider than any of them."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(kv_lens)
    slots = total + 5
    k_pool = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    v_pool = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(slots - 1, generator=gen) + 1
    table = torch.zeros(len(kv_lens) + 3, max(kv_lens) + 4, dtype=torch.int64)
    rows = torch.tensor([2, 0, 4, 1, 3][: len(kv_lens)])
    offset = 0
    for row, n in zip(rows.tolist(), kv_lens):
        table[row, :n] = perm[offset:offset + n]
        offset += n
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    return q, k_pool, v_pool, table.to(DEVICE), rows.to(DEVICE), starts.to(DEVICE), torch.tensor(kv_lens).to(DEVICE)


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), BF16])
@pytest.mark.parametrize("lens,heads", [
    (([5, 1, 9], [5, 4, 9]), (4, 2, 16)),         # a fresh prompt, a decode-like row after a prefix, a full prompt
    (([20, 3], [33, 3]), (6, 2, 24)),             # chunk after a 13-token prefix; head_dim not a power of two
    (([70], [90]), (8, 8, 32)),                   # several query blocks and key blocks, no GQA
])
def test_kernel_matches_reference(lens, heads, dtype, tol):
    q_lens, kv_lens = lens
    q, k_pool, v_pool, table, rows, starts, kv = _case(q_lens, kv_lens, *heads, dtype=dtype)
    out = paged_prefill_attention(q, k_pool, v_pool, table, rows, starts, kv, max(q_lens), block_m=16, block_n=16)
    ref = paged_prefill_attention_ref(q, k_pool, v_pool, table, rows, starts, kv)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel_err(out, ref) < tol


def test_reference_matches_causal_sdpa():
    q, k_pool, v_pool, table, rows, starts, kv = _case([6], [6], 4, 2, 16, torch.float32)
    ref = paged_prefill_attention_ref(q, k_pool, v_pool, table, rows, starts, kv)
    slots = table[rows[0], :6]
    keys = k_pool[slots].repeat_interleave(2, dim=1).transpose(0, 1)[None]
    values = v_pool[slots].repeat_interleave(2, dim=1).transpose(0, 1)[None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, is_causal=True)
    assert _rel_err(ref, sdpa[0].transpose(0, 1)) < 1e-6


def test_bad_shapes_are_refused():
    q, k_pool, v_pool, table, rows, starts, kv = _case([3, 2], [3, 2], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="q_starts"):
        paged_prefill_attention(q, k_pool, v_pool, table, rows, starts[:-1], kv, 3)
    with pytest.raises(ValueError, match="Hkv"):
        paged_prefill_attention(q[:, :3], k_pool, v_pool, table, rows, starts, kv, 3)
