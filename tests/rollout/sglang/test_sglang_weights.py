"""The SGLang backend's RL verbs over real HTTP on 127.0.0.1, against ``r3 serve``'s copy of SGLang's endpoints.

The server runs the built-in engine in this process, so every reply can be checked against a
fresh engine on the new weights, and the engine's state can be read.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rollout.engine.engine import Engine
from rollout.serve.server import R3Server
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.http_client import HTTPClient
from rollout.types import SamplingParams

PROMPTS = [[5, 17, 300, 42, 7, 99], [250, 11, 3, 480, 9, 1, 2]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
SMALL = dict(kv_slots=512, max_running_requests=8, max_batch_tokens=256)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)


@pytest.fixture
def served(models):
    """A fresh engine on the old weights behind r3 serve, and a backend talking to it."""
    engine = Engine(models[0], dtype="float32", **SMALL)
    server = R3Server(engine, models[0], port=0)
    server.start_background()
    backend = SGLangBackend(url=server.url, model_path=models[0])
    yield engine, server, backend
    backend.close()
    server.shutdown()


def _one_by_one(backend, sampling=GREEDY):
    """Requests sent together batch as they arrive, and batch shape moves the last bits: compare batches of one."""
    return [backend.generate([p], sampling)[0] for p in PROMPTS]


def _state_dict(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _same(got, want):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        assert np.array_equal(g.routed_experts.ids, w.routed_experts.ids)
        assert np.abs(np.asarray(g.output_logprobs) - np.asarray(w.output_logprobs)).max() <= 1e-6


def test_update_from_trainer_tensors_and_from_disk_equal_a_fresh_engine(served, models):
    engine, server, backend = served
    assert backend.weight_version == "0"
    before = _one_by_one(backend)  # fills the server's prefix cache with old KV and routes
    backend.update_weights(_state_dict(models[1]), version=1)  # fused trainer names, staged as checkpoint names
    assert backend.weight_version == "1" and engine.weight_version == "1"
    reference = Engine(models[1], dtype="float32", **SMALL)
    fresh = [reference.generate([p], GREEDY)[0] for p in PROMPTS]
    got = _one_by_one(backend)
    _same(got, fresh)
    assert all(r.weight_version == "1" for r in got) and all(r.weight_version == "0" for r in before)
    backend.update_weights_from_disk(models[0], version="back")
    _same(_one_by_one(backend), before)  # the old weights again, through the cache flush
    assert backend.weight_version == "back"


def test_a_bad_update_is_refused_and_the_server_keeps_serving(served, models, tmp_path):
    engine, server, backend = served
    before = _one_by_one(backend)
    weights = _state_dict(models[1])
    weights["model.norm.weight"] = weights["model.norm.weight"][:-1]
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \[63\] does not match the model's \[64\]"):
        backend.update_weights(weights, version=1)  # checked before anything is staged or sent
    with pytest.raises(ValueError, match="is not a directory with \\*.safetensors files"):
        backend.update_weights_from_disk(tmp_path / "nothing-here", version=1)
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"model.layers.0.mlp.experts.9.up_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "bad" / "x.safetensors"))
    with pytest.raises(ValueError, match="HTTP 400: 'model.layers.0.mlp.experts.9.up_proj.weight' is not a parameter"):
        backend.update_weights_from_disk(tmp_path / "bad", version=1)
    with pytest.raises(ValueError, match="in_flight='continue' is refused for SGLang"):
        backend.update_weights(_state_dict(models[1]), version=1, in_flight="continue")
    assert backend.weight_version == "0"
    _same(_one_by_one(backend), before)
    client = HTTPClient(server.url)
    with pytest.raises(ValueError, match="HTTP 400: r3 serve does not accept serialized tensors"):
        client.post_json("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]})
    with pytest.raises(ValueError, match=r"HTTP 400: unknown field\(s\) \['model'\]"):
        client.post_json("/update_weights_from_disk", {"model": str(models[1])})
    client.close()


def _generate_in_thread(backend, prompt, sampling):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", backend.generate([prompt], sampling)[0]))
    thread.start()
    return thread, out


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_pause_then_update_continues_requests_on_the_new_weights(served, models):
    engine, server, backend = served
    long = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    backend.pause_generation(mode="in_place")
    thread, out = _generate_in_thread(backend, PROMPTS[0], long)
    _wait_for(lambda: engine.has_unfinished(), "the request to reach the paused engine")
    with pytest.raises(ValueError, match="Cache not flushed: 1 requests are running or waiting"):
        backend.flush_cache()
    backend.update_weights(_state_dict(models[1]), version="new")  # paused: the request continues across
    backend.continue_generation()
    thread.join(60)
    rollout = out["r"]
    assert rollout.weight_version == "new" and len(rollout.output_ids) == 40
    backend.flush_cache()  # idle now: accepted


def test_release_refuses_generation_until_resume(served):
    engine, server, backend = served
    before = _one_by_one(backend)
    backend.release_memory(weights=True)
    assert engine.kv.k.numel() == 0
    with pytest.raises(ValueError, match="memory is released"):
        backend.generate(PROMPTS, GREEDY)
    with pytest.raises(ValueError, match="already released"):
        backend.release_memory()
    backend.resume_memory()
    _same(_one_by_one(backend), before)


def test_pause_in_abort_mode_aborts_what_runs(served):
    engine, server, backend = served
    long = SamplingParams(max_new_tokens=200, temperature=1.0, seed=1)
    thread, out = _generate_in_thread(backend, PROMPTS[1], long)
    _wait_for(lambda: engine.has_unfinished(), "the request to start")
    backend.pause_generation()  # SGLang's default mode: abort
    thread.join(60)
    assert out["r"].finish_reason == "abort" and len(out["r"].output_ids) < 200
    backend.continue_generation()
    assert backend.generate([PROMPTS[0]], GREEDY)[0].finish_reason == "length"
