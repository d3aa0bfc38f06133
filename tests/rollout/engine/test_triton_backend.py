"""Decode attention through the paged Triton kernel equals the torch path (CPU: Triton's interpreter)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported (decoration time)
pytest.importorskip("triton")

from rollout.engine.engine import Engine  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402


def test_triton_decode_attention_matches_torch(qwen3_dir):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    ref = Engine(qwen3_dir, device=device).generate(prompts, sampling)
    out = Engine(qwen3_dir, device=device, attention_backend="triton").generate(prompts, sampling)
    for a, b in zip(ref, out):
        assert a.output_ids == b.output_ids and a.routed_experts == b.routed_experts
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5
