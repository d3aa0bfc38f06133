"""``RolloutWorker``'s RL verbs on the built-in engine: the same calls the SGLang backend answers."""

from __future__ import annotations

import pytest
import torch

from rollout.types import SamplingParams
from rollout.worker import RolloutWorker

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def test_worker_updates_versions_flushes_and_lends_memory(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    with RolloutWorker(old, kv_slots=256) as worker, RolloutWorker(new, kv_slots=256) as reference:
        assert worker.weight_version == 0
        worker.generate([PROMPT], GREEDY)
        worker.update_weights(AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).state_dict(), "v1")
        (got,), (want,) = worker.generate([PROMPT], GREEDY), reference.generate([PROMPT], GREEDY)
        assert got.output_ids == want.output_ids and got.output_logprobs == want.output_logprobs
        assert worker.weight_version == "v1" == got.weight_version
        worker.flush_cache()
        worker.release_memory(weights=True)
        with pytest.raises(ValueError, match="memory is released"):
            worker.generate([PROMPT], GREEDY)
        worker.resume_memory()
        assert worker.generate([PROMPT], GREEDY)[0].output_ids == want.output_ids
    with pytest.raises(ValueError, match="the engine is closed"):
        worker.update_weights({}, 2)
    with pytest.raises(ValueError, match="the engine is closed"):
        worker.release_memory()


def test_flush_is_refused_while_a_request_holds_kv(tiny_model_dir):
    with RolloutWorker(tiny_model_dir("tiny-qwen3-moe", 0), kv_slots=256) as worker:
        engine = worker.backend
        engine.add_request(PROMPT, SamplingParams(max_new_tokens=20, temperature=0))
        engine.step()
        with pytest.raises(ValueError, match="cannot flush the cache while 1 requests hold KV"):
            worker.flush_cache()
