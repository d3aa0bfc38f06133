"""Fuzzed ``/generate`` bodies: parse_request raises only ValueError, and the live server answers 4xx JSON.

Bounded here (a few hundred cases); ``R3_FUZZ_SCALE=100`` runs the same properties with tens of
thousands (the campaign in docs/benchmarks.md).
"""

from __future__ import annotations

import http.client
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.engine.engine import Engine
from rollout.serve.server import R3Server
from rollout.sglang.protocol import parse_request

# R3_FUZZ_SCALE=100 turns these bounded fuzz tests into the long campaign (docs/benchmarks.md, issue 14).
FUZZ_SCALE = int(os.environ.get("R3_FUZZ_SCALE", "1"))


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_FIELDS = ["input_ids", "sampling_params", "return_logprob", "return_routed_experts", "routed_experts_start_len",
           "stream", "rid", "routed_experts_format", "logprob_start_len"]
_SAMPLING = ["max_new_tokens", "temperature", "top_p", "top_k", "sampling_seed", "stop_token_ids"]
# Bodies near the valid shape (the interesting edge), not only random JSON.
_NEAR = st.fixed_dictionaries(
    {"input_ids": st.one_of(st.lists(st.integers(-3, 600), max_size=5), _JSON)},
    optional={
        **{k: _JSON for k in _FIELDS[2:]},
        "sampling_params": st.one_of(_JSON, st.dictionaries(st.sampled_from(_SAMPLING), _SCALARS, max_size=6)),
    },
)
BODIES = st.one_of(_JSON, _NEAR)


@settings(max_examples=400 * FUZZ_SCALE, deadline=None)
@given(BODIES)
def test_fuzz_parse_request_raises_only_value_error(body):
    for raw in (body, json.dumps(body).encode()):
        try:
            request = parse_request(raw, vocab_size=512, max_seq_len=64)
        except ValueError as exc:
            assert str(exc)
            continue
        for item in request.items:  # what parses is within the engine's limits
            assert 1 <= len(item.prompt_ids) and all(0 <= t < 512 for t in item.prompt_ids)
            assert len(item.prompt_ids) + item.sampling.max_new_tokens <= 64


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = tiny_model_dir("tiny-qwen3-moe")
    server = R3Server(Engine(model, max_context=32), model, port=0)
    server.start_background()
    yield server
    server.shutdown()


@settings(max_examples=120 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(BODIES.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64)))
def test_fuzz_the_live_server_answers_every_body(server, raw):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/generate", raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status == 200:
        return  # a body that happens to be valid
    assert 400 <= resp.status < 500, (resp.status, data[:200])
    assert json.loads(data)["error"]["message"]
