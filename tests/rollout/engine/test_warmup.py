"""The start-up warm-up: it must walk the step shapes a first real batch would meet, then leave no trace."""

import numpy as np
import pytest

from rollout.engine.engine import Engine
from rollout.engine.warmup import TAIL_PROMPT_LEN, warmup_prompts
from rollout.types import SamplingParams


@pytest.mark.parametrize("max_batch_tokens, max_context", [(64, 2048), (64, 20), (7, 2048)])
def test_round_one_fills_a_step_to_one_token_short(max_batch_tokens, max_context):
    first, second = warmup_prompts(max_batch_tokens, max_context, vocab=512)
    body, tail = first[:-1], first[-1]
    assert sum(map(len, body)) == max_batch_tokens - 1 and len(tail) == TAIL_PROMPT_LEN
    assert all(len(p) + 2 < max_context for p in first + second)
    assert second[0][0] == first[0][0] and second[1][: len(second[1]) - 1] == first[0][: len(second[1]) - 1]


def _engine(path, warmup):
    return Engine(path, kv_slots=4096, max_batch_tokens=64, warmup=warmup)


def test_warmup_meets_a_split_chunk_and_prefix_hits_then_forgets_them(qwen3_dir):
    engine = _engine(qwen3_dir, warmup=True)
    report = engine.warmup_report
    assert report["one_token_chunks"] >= 1 and report["steps"] >= 3
    assert report["prefix_hit_tokens"] >= 1 + 64 // 2 - 1  # one token, then half of the first prompt
    assert engine.stats == {"prefix_hit_tokens": 0, "computed_tokens": 0, "preemptions": 0, "cached_tokens": 0,
                            "free_slots": 4096}
    assert not engine.has_unfinished() and engine.take_finished() == []
    assert (engine.capture.host_cache == np.iinfo(engine.capture.host_cache.dtype).max).all()


def test_a_warmed_engine_serves_what_a_cold_one_does(qwen3_dir):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, size=int(n)).tolist() for n in (5, 30, 12)]
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    warm, cold = _engine(qwen3_dir, warmup=True), _engine(qwen3_dir, warmup=False)
    assert cold.warmup_report is None
    for a, b in zip(warm.generate(prompts, sampling), cold.generate(prompts, sampling)):
        assert a.output_ids == b.output_ids and a.meta["prefix_hit_tokens"] == b.meta["prefix_hit_tokens"] == 0
        assert np.array_equal(a.routed_experts.ids, b.routed_experts.ids)
        assert np.allclose(a.output_logprobs, b.output_logprobs, atol=1e-5)
