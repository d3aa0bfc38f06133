"""``release_memory`` / ``resume_memory``: the KV pool (and the weights) leave and come back intact.

On CPU the "host copy" of the weights is a second CPU tensor, so the same code path runs:
every weight is replaced by a copy on release and by another on resume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout.engine.engine import Engine
from rollout.engine.weights import engine_tensors
from rollout.types import SamplingParams

PROMPTS = [[5, 17, 300, 42, 7, 99, 123, 4], [250, 11, 3, 480, 9]]
SAMPLING = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=i) for i in range(len(PROMPTS))]
SMALL = dict(kv_slots=256, max_running_requests=4, max_batch_tokens=128)


def _same(got, want):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids and g.output_logprobs == w.output_logprobs
        assert np.array_equal(g.routed_experts.ids, w.routed_experts.ids)


@pytest.mark.parametrize("weights", [False, True])
def test_release_then_resume_serves_exactly_as_before(qwen3_dir, weights):
    engine = Engine(qwen3_dir, dtype="float32", **SMALL)
    before = engine.generate(PROMPTS, SAMPLING)
    kv_shape = engine.kv.k.shape
    old = {k: t.clone() for k, t in engine_tensors(engine.model.weights).items()}
    engine.release_memory(weights=weights)
    assert engine.kv.k.numel() == 0 and engine.kv.v.numel() == 0
    assert engine.stats["cached_tokens"] == 0  # the prefix cache pointed into the freed pool
    with pytest.raises(ValueError, match=r"memory is released \(release_memory\(\)\): call resume_memory\(\) first"):
        engine.generate(PROMPTS, SAMPLING)
    with pytest.raises(ValueError, match="memory is released"):
        engine.release_memory()
    engine.resume_memory()
    assert engine.kv.k.shape == kv_shape
    now = engine_tensors(engine.model.weights)
    assert all(torch.equal(now[k], t) for k, t in old.items())
    _same(engine.generate(PROMPTS, SAMPLING), before)
    with pytest.raises(ValueError, match="resume_memory\\(\\) without release_memory\\(\\)"):
        engine.resume_memory()


def test_release_refuses_an_engine_with_unfinished_requests(qwen3_dir):
    engine = Engine(qwen3_dir, dtype="float32", **SMALL)
    rid = engine.add_request(PROMPTS[0], SAMPLING[0])
    engine.step()
    with pytest.raises(ValueError, match="release_memory\\(\\) with 1 unfinished requests"):
        engine.release_memory()
    engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    engine.release_memory()
    engine.resume_memory()


def test_update_while_the_weights_are_on_the_host_is_what_resume_uploads(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="float32", **SMALL)
    engine.generate(PROMPTS, SAMPLING)
    engine.release_memory(weights=True)
    engine.update_weights(AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).state_dict(), version=1)
    engine.resume_memory()
    got = engine.generate(PROMPTS, SAMPLING)
    _same(got, Engine(new, dtype="float32", **SMALL).generate(PROMPTS, SAMPLING))
    assert all(r.weight_version == 1 for r in got)
