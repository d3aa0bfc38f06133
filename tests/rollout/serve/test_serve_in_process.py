"""``R3Server`` in this process, where the engine can be watched: streaming chunks, and giving up on a request.

Streaming: a chunk per engine step with the tokens so far, then the finished
reply with its routes. Timeouts: the server answers 504 and aborts the request
in the engine instead of letting it run to the end.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from rollout.engine.engine import Engine
from rollout.serve.server import R3Server
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.http_client import HTTPClient
from rollout.types import SamplingParams


def test_stream_sends_growing_chunks_then_the_full_reply(engine, model):
    server = R3Server(engine, model, port=0)
    server.start_background()
    try:
        prompt = [5, 4, 3, 2, 1, 9]
        with SGLangBackend(url=server.url, model_path=model) as backend:
            (whole,) = backend.generate([prompt], SamplingParams(6, temperature=0))
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0},
                "return_logprob": True, "return_routed_experts": True, "stream": True}
        conn.request("POST", "/generate", json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        events = [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e]
        # The connection stays usable after a chunked reply.
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.shutdown()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    for partial in chunks[:-1]:
        n = len(partial["output_ids"])
        assert partial["output_ids"] == whole.output_ids[:n]
        streamed_logprobs = [lp for lp, _, _ in partial["meta_info"]["output_token_logprobs"]]
        assert streamed_logprobs == pytest.approx(whole.output_logprobs[:n], abs=1e-5)
        assert partial["meta_info"]["finish_reason"] is None and "routed_experts" not in partial["meta_info"]
    final = chunks[-1]
    assert final["output_ids"] == whole.output_ids
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert final["meta_info"]["routed_experts"] == whole.routed_experts.to_sglang(4)


def _wait_idle(engine, seconds=5.0):
    deadline = time.perf_counter() + seconds
    while engine.has_unfinished() and time.perf_counter() < deadline:
        time.sleep(0.05)
    return not engine.has_unfinished()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_timeout_gets_504_and_is_aborted(engine, model, stream):
    server = R3Server(engine, model, port=0, request_timeout=0.3)
    server.start_background()
    try:
        client = HTTPClient(server.url, max_retries=0)
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2040, "temperature": 0}}
        if stream:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", "/generate", json.dumps({**body, "stream": True}))
            resp = conn.getresponse()
            text = resp.read().decode()
            conn.close()
            # Chunks went out before the deadline, so the timeout arrives as SGLang's error chunk.
            assert resp.status == 200 and "no result within 0.3s" in text and text.endswith("data: [DONE]\n\n")
        else:
            with pytest.raises(RuntimeError, match="HTTP 504: no result within 0.3s"):
                client.post_json("/generate", body)
        # 2040 tokens would keep the engine busy for a long time; the abort frees it within a few steps.
        assert _wait_idle(engine)
        reply = client.post_json("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
        assert len(reply["output_ids"]) == 2
    finally:
        server.shutdown()


class FailingEngine(Engine):
    """The built-in engine with a fault injected into ``step``: the failure path a healthy engine never takes."""

    def step(self):
        raise RuntimeError("injected fault")


def test_an_engine_failure_fails_requests_and_health_but_not_the_server(model):
    server = R3Server(FailingEngine(model), model, port=0)
    server.start_background()
    try:
        client = HTTPClient(server.url, max_retries=0)
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
        with pytest.raises(RuntimeError, match="HTTP 503: engine failed: RuntimeError\\('injected fault'\\)"):
            client.post_json("/generate", body)
        with pytest.raises(RuntimeError, match="HTTP 503: engine failed"):
            client.post_json("/generate", body)  # later requests fail fast instead of hanging
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()
    finally:
        server.shutdown()
