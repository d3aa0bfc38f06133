"""The engine on its Triton kernels equals the torch path (CPU: Triton's interpreter, float32)."""

import pytest
import torch

pytest.importorskip("triton")  # off CUDA, the root conftest switches on Triton's interpreter

from rollout.engine.engine import Engine  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_TRITON = dict(attention_backend="triton", moe_backend="triton", layer_kernels="triton")
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]


def _assert_same(ref, out, tol=1e-5):
    for a, b in zip(ref, out):
        assert a.output_ids == b.output_ids and a.routed_experts == b.routed_experts
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < tol


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral"])
def test_triton_kernels_match_torch(tiny_model_dir, preset):
    """Paged prefill/decode attention, fused MoE and the fused norm/RoPE/router kernels, on every family
    (q/k norm, q/k/v bias, a shared expert, a dense layer, fp32 router weights)."""
    path = tiny_model_dir(preset)
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, seed=3)
    options = dict(device=DEVICE, dtype="float32")
    ref = Engine(path, attention_backend="torch", moe_backend="torch", layer_kernels="torch", overlap=DEVICE == "cpu",
                 **options).generate(PROMPTS, sampling)
    _assert_same(ref, Engine(path, **ALL_TRITON, **options).generate(PROMPTS, sampling))


def test_triton_prefill_after_a_prefix_hit_and_in_chunks(qwen3_dir):
    """Chunked prefill and prefix-cache hits reach the paged prefill kernel with kv_len > q_len."""
    prefix = list(range(30, 50))
    prompts = [prefix + [1, 2], prefix + [3, 4, 5]]
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, seed=5)
    options = dict(max_batch_tokens=16, kv_slots=256, dtype="float32")
    ref = Engine(qwen3_dir, **options)
    expected = ref.generate(prompts[:1], sampling) + ref.generate(prompts[1:], sampling)
    engine = Engine(qwen3_dir, prefill_attention_backend="triton", **options)
    out = engine.generate(prompts[:1], sampling) + engine.generate(prompts[1:], sampling)
    assert engine.stats["prefix_hit_tokens"] >= len(prefix)
    _assert_same(expected, out)


def test_padded_static_buffer_decode_matches_eager(qwen3_dir):
    """The CUDA-graph runner's padded forward, run eagerly here: pad rows must not disturb real ones."""
    from rollout.engine.cuda_graph import DecodeGraphs

    sampling = SamplingParams(max_new_tokens=2, temperature=1.0, seed=4)  # 3 rows run in the size-4 graph
    ref = Engine(qwen3_dir, **ALL_TRITON).generate(PROMPTS, sampling)
    engine = Engine(qwen3_dir, max_running_requests=8, **ALL_TRITON)
    engine.graphs = DecodeGraphs(
        engine.model, engine.kv, engine.table.req_to_slot, engine.table.pad_row, engine.future_tokens,
        engine.capture.record, max_batch=8, capture=False,
    )
    out = engine.generate(PROMPTS, sampling)
    assert engine.graphs.replays > 0
    _assert_same(ref, out)
