"""``r3 serve --no-capture --api-key``, and dense layers on the wire, on tiny Qwen2-MoE (layer 0 is dense)."""

from __future__ import annotations

import base64
import urllib.request

import numpy as np
import pytest

from rollout import RolloutWorker
from rollout.engine.engine import Engine
from rollout.serve.server import R3Server
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.http_client import HTTPClient
from rollout.types import SamplingParams

KEY = "sekret"
SAMPLING = SamplingParams(5, temperature=0)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("tiny-qwen2-moe")


@pytest.fixture(scope="module")
def no_capture(start_serve, model):
    return start_serve(model, "--no-capture", "--api-key", KEY)


def test_server_without_capture_gives_a_clear_error(no_capture, model):
    with SGLangBackend(url=no_capture.url, model_path=model, api_key=KEY) as backend:
        with pytest.raises(ValueError, match="enable-return-routed-experts"):
            backend.generate(PROMPTS, SAMPLING)
    with SGLangBackend(url=no_capture.url, model_path=model, api_key=KEY, return_routed_experts=False) as backend:
        out = backend.generate(PROMPTS, SAMPLING)
    assert [r.routed_experts for r in out] == [None, None]
    assert [len(r.output_ids) for r in out] == [5, 5]


def test_api_key_is_required_except_for_health(no_capture, model):
    for key in (None, "wrong"):
        with pytest.raises(ValueError, match="HTTP 401"):
            HTTPClient(no_capture.url, api_key=key).post_json("/generate", {"input_ids": [1], "sampling_params": {}})
        with pytest.raises(ValueError, match="HTTP 401"):
            HTTPClient(no_capture.url, api_key=key).get_json("/get_model_info")
    with urllib.request.urlopen(no_capture.url + "/health", timeout=30) as resp:
        assert resp.status == 200
    info = HTTPClient(no_capture.url, api_key=KEY).get_json("/get_model_info")
    assert info["capture"] is False and info["model_type"] == "qwen2_moe"


def test_dense_layers_are_zeros_on_the_wire_and_dropped_by_the_backend(model):
    engine = Engine(model)
    server = R3Server(engine, model, port=0)
    server.start_background()
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        R3Server(engine, model, port=server.port)
    try:
        with SGLangBackend(url=server.url, model_path=model) as backend:
            served = backend.generate(PROMPTS, SAMPLING)
        body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 5, "temperature": 0},
                "return_logprob": True, "return_routed_experts": True}
        raw = HTTPClient(server.url).post_json("/generate", body)
    finally:
        server.shutdown()
    wire = np.frombuffer(base64.b64decode(raw["meta_info"]["routed_experts"]), "<i4").reshape(-1, 4, 2)
    assert wire.shape[0] == len(PROMPTS[0]) + 5 - 1
    assert not wire[:, 0].any()  # layer 0 is dense: zeros, as SGLang writes it
    with RolloutWorker(model) as worker:
        local = worker.generate(PROMPTS, SAMPLING)
    for s, l in zip(served, local):
        assert s.routed_experts.moe_layers == (1, 2, 3)
        assert s.routed_experts == l.routed_experts and s.output_ids == l.output_ids
    assert np.array_equal(wire[:, 1:], served[0].routed_experts.to_int32())


def test_sigterm_stops_the_server_cleanly(no_capture):
    assert no_capture.stop() == 0
    assert "r3 serve: stopped" in no_capture.stderr_text()
