"""Decode attention through the paged Triton kernel equals the torch path (CPU: Triton's interpreter)."""

import pytest
import torch

pytest.importorskip("triton")  # off CUDA, the root conftest switches on Triton's interpreter

from rollout.engine.engine import Engine  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402


def test_triton_decode_attention_matches_torch(qwen3_dir):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    ref = Engine(qwen3_dir, device=device).generate(prompts, sampling)
    out = Engine(qwen3_dir, device=device, attention_backend="triton").generate(prompts, sampling)
    for a, b in zip(ref, out):
        assert a.output_ids == b.output_ids and a.routed_experts == b.routed_experts
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5


def test_padded_static_buffer_decode_matches_eager(qwen3_dir):
    """The CUDA-graph runner's padded forward, run eagerly here: pad rows must not disturb real ones."""
    from rollout.engine.cuda_graph import DecodeGraphs

    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]  # 3 rows run in the size-4 graph: one pad row
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, seed=4)
    ref = Engine(qwen3_dir, attention_backend="triton").generate(prompts, sampling)
    engine = Engine(qwen3_dir, attention_backend="triton", max_running_requests=8)
    engine.graphs = DecodeGraphs(
        engine.model, engine.kv, engine.table.req_to_slot, engine.table.pad_row, engine.future_tokens,
        engine.capture.record, max_batch=8, capture=False,
    )
    out = engine.generate(prompts, sampling)
    assert engine.graphs.replays > 0
    for a, b in zip(ref, out):
        assert a.output_ids == b.output_ids and a.routed_experts == b.routed_experts
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5
