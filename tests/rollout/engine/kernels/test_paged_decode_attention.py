"""The Triton paged decode attention against its torch reference, and the reference against plain SDPA."""

import pytest
import torch

pytest.importorskip("triton")

from rollout.engine.kernels.paged_decode_attention import DecodeConfig, paged_decode_attention, paged_decode_attention_ref
from kernel_params import DEVICE, BF16  # noqa: E402


def _case(batch, num_q_heads, num_kv_heads, head_dim, max_len, dtype, seed=0, slots=None):
    """Random pool with each sequence's slots scattered over it, like a pool after many alloc/free cycles."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    seq_lens[0] = max_len  # one full row, so the last block boundary is exercised
    slots = slots or int(seq_lens.sum()) + 7
    k_pool = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_pool = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(slots, generator=gen)
    table = torch.full((batch, max_len), slots - 1, dtype=torch.int32)  # padding points at a real slot
    offset = 0
    for b, n in enumerate(seq_lens.tolist()):
        table[b, :n] = perm[offset:offset + n].to(torch.int32)
        offset += n
    return q, k_pool, v_pool, table.to(DEVICE), seq_lens.to(DEVICE, torch.int32)


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), BF16])
@pytest.mark.parametrize("shape", [
    (3, 4, 2, 16, 37),    # tiny presets: GQA 2, head_dim 16
    (2, 8, 8, 64, 70),    # no GQA, head_dim 64
    (2, 32, 4, 128, 65),  # bench-qwen3-moe heads: GQA 8, head_dim 128
    (2, 6, 2, 24, 5),     # head_dim and group that are not powers of two
])
def test_kernel_matches_reference(shape, dtype, tol):
    q, k_pool, v_pool, table, lens = _case(*shape, dtype=dtype)
    out = paged_decode_attention(q, k_pool, v_pool, table, lens, config=DecodeConfig(block_n=32))
    ref = paged_decode_attention_ref(q, k_pool, v_pool, table, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < tol


def test_padding_entries_are_never_read():
    """Garbage past seq_len in the table (even out-of-range slots) must not change the result."""
    q, k_pool, v_pool, table, lens = _case(3, 4, 2, 16, 40, torch.float32)
    clean = paged_decode_attention(q, k_pool, v_pool, table, lens, config=DecodeConfig(block_n=16))
    dirty = table.clone()
    positions = torch.arange(table.shape[1], device=table.device)
    dirty[positions[None, :] >= lens[:, None].long()] = 10**8
    assert torch.equal(paged_decode_attention(q, k_pool, v_pool, dirty, lens, config=DecodeConfig(block_n=16)), clean)


def test_table_rows_index_a_larger_request_table():
    """The engine passes its whole request->slot table plus each sequence's row: same result as the gathered rows."""
    q, k_pool, v_pool, table, lens = _case(3, 4, 2, 16, 33, torch.float32)
    big = torch.zeros(7, 33, dtype=torch.int64, device=table.device)
    rows = torch.tensor([5, 0, 3], device=table.device)
    big[rows] = table.long()
    expected = paged_decode_attention(q, k_pool, v_pool, table, lens, config=DecodeConfig(block_n=16))
    assert torch.equal(paged_decode_attention(q, k_pool, v_pool, big, lens, table_rows=rows, config=DecodeConfig(block_n=16)), expected)
    ref = paged_decode_attention_ref(q, k_pool, v_pool, big, lens, table_rows=rows)
    assert _rel_err(expected, ref) < 1e-5


def test_reference_matches_sdpa_on_contiguous_slots():
    """The reference itself, against torch's SDPA on the same keys laid out densely."""
    q, k_pool, v_pool, table, lens = _case(2, 4, 2, 16, 9, torch.float32)
    lens[:] = 9
    ref = paged_decode_attention_ref(q, k_pool, v_pool, table, lens)
    keys = k_pool[table.long()].repeat_interleave(2, dim=2).transpose(1, 2)  # [B, Hq, S, D]
    values = v_pool[table.long()].repeat_interleave(2, dim=2).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], keys, values)[:, :, 0]
    assert _rel_err(ref, sdpa) < 1e-6


def test_bad_shapes_are_refused():
    q, k_pool, v_pool, table, lens = _case(2, 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_attention(q[:, :3], k_pool, v_pool, table, lens)
    with pytest.raises(ValueError, match="slot_table"):
        paged_decode_attention(q, k_pool, v_pool, table[:1], lens)
    with pytest.raises(ValueError, match="int32 or int64"):
        paged_decode_attention(q, k_pool, v_pool, table.float(), lens)
    with pytest.raises(ValueError, match="table_rows"):
        paged_decode_attention(q, k_pool, v_pool, table, lens, table_rows=lens[:1])
