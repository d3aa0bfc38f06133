"""Sync-free grouped-GEMM experts against a per-token loop, through the real ``torch._grouped_mm``."""

import pytest
import torch

from rollout.engine.kernels.grouped_experts import (
    expert_offsets,
    experts_forward_ref,
    grouped_experts_forward,
    grouped_mm_available,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA grouped_mm is bf16-only; on CPU fp32 checks the offsets logic without rounding noise.
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]


def _case(n, num_experts, top_k, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen)
    scores = torch.randn(n, num_experts, generator=gen).softmax(-1)
    top_w, top_ids = scores.topk(top_k, dim=-1)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return [t.to(DEVICE) for t in (x.to(dtype), top_ids, top_w.to(dtype), gate_up.to(dtype), down.to(dtype))]


def test_offsets_count_every_expert_including_empty_ones():
    sorted_ids = torch.tensor([0, 0, 2, 2, 2, 5], device=DEVICE)
    assert expert_offsets(sorted_ids, 7).tolist() == [2, 2, 5, 5, 5, 6, 6]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_experts,top_k,hidden,inter", [(1, 8, 2, 64, 32), (37, 8, 2, 64, 32), (50, 128, 8, 64, 32)])
def test_grouped_matches_loop(n, num_experts, top_k, hidden, inter, dtype):
    args = _case(n, num_experts, top_k, hidden, inter, dtype)
    assert grouped_mm_available(args[0])
    out = grouped_experts_forward(*args)
    ref = experts_forward_ref(*args)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert out.dtype == dtype and out.shape == args[0].shape
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_repeat_calls_are_bit_identical():
    """Fixed-order sums and a stable sort: the same batch gives the same bits every time (no atomics)."""
    args = _case(40, 8, 2, 64, 32, DTYPES[0])
    assert torch.equal(grouped_experts_forward(*args), grouped_experts_forward(*args))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_has_no_host_sync():
    """Capturing the call in a CUDA graph fails on any host sync; replaying it must match eager."""
    args = _case(64, 128, 8, 256, 128, torch.bfloat16)
    eager = grouped_experts_forward(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grouped_experts_forward(*args)  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grouped_experts_forward(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
