"""``R3Server`` under hostile or careless clients, in this process where the engine can be watched.

Slow and stalled clients get a deadline, not a thread forever; bodies past the limit get 413
unread; a client that hangs up has its request aborted in the engine; every request gets a
request id; compact routes come back when asked for; an empty API key is refused; a fault in
one request is a 500 for that request alone.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import pytest

from rollout.engine.engine import Engine
from rollout.routed_experts import RoutedExperts
from rollout.serve.server import R3Server
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.http_client import HTTPClient
from rollout.types import SamplingParams

BODY = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}


@pytest.fixture
def serve(engine, model):
    started = []

    def start(**kwargs):
        server = R3Server(kwargs.pop("engine", engine), model, port=0, **kwargs)
        server.start_background()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def _wait_idle(engine, seconds=10.0):
    deadline = time.perf_counter() + seconds
    while engine.has_unfinished() and time.perf_counter() < deadline:
        time.sleep(0.02)
    return not engine.has_unfinished()


def test_short_bodies_and_stalled_heads_get_a_deadline_not_a_worker(serve):
    server = serve(body_timeout=0.5, max_connections=64)
    stalled = []
    for _ in range(40):  # 40 clients that promise 100 bytes and send 2, and 10 that never finish their head
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
        stalled.append(s)
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le")
        stalled.append(s)
    good = HTTPClient(server.url, max_retries=0).post_json("/generate", BODY)  # served meanwhile
    assert len(good["output_ids"]) == 3
    started = time.perf_counter()
    replies = []
    for s in stalled:
        out = b""
        while chunk := s.recv(65536):  # the server closes every one of them
            out += chunk
        s.close()
        replies.append(out)
    assert time.perf_counter() - started < 5
    short = [r for r in replies if r]
    assert len(short) == 40 and all(r.startswith(b"HTTP/1.1 408") for r in short)
    assert all(b"request body not received within 0.5s" in r for r in short)


def test_connections_past_the_limit_get_503_and_the_rest_are_served(serve):
    server = serve(body_timeout=2.0, max_connections=4)  # uvicorn counts the new connection too: 3 busy fill it
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    for s in held:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.2)
    assert b" 503 " in _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").split(b"\r\n")[0]
    for s in held:
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 408")  # the busy ones were served (here: timed out), not refused
        s.close()
    time.sleep(0.2)
    assert len(HTTPClient(server.url, max_retries=0).post_json("/generate", BODY)["output_ids"]) == 3


def test_chunked_bodies_are_read_within_the_limit(serve):
    server = serve()
    body = json.dumps(BODY).encode()
    chunked = b"".join(b"%X\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    reply = _raw(server.port, head + chunked + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and b'"output_ids"' in reply
    big = b"%X\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    conn.sendall(head)
    try:
        for _ in range(17):  # 17 MiB of whitespace, past the 16 MiB limit
            conn.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed once the limit was crossed
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_has_its_request_aborted(serve, engine, stream):
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2000, "temperature": 0}, "stream": stream}
    conn.request("POST", "/generate", json.dumps(body))
    deadline = time.perf_counter() + 10
    while not engine.has_unfinished() and time.perf_counter() < deadline:
        time.sleep(0.01)
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read1(65536).startswith(b"data: ")
    assert engine.has_unfinished()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait_idle(engine)  # 2000 tokens would take many seconds; the abort frees it within a few steps
    assert len(HTTPClient(server.url, max_retries=0).post_json("/generate", BODY)["output_ids"]) == 3


def test_every_request_is_logged_with_its_request_id(serve, caplog):
    server = serve()
    with caplog.at_level(logging.INFO, logger="r3.serve"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/generate", json.dumps(BODY), headers={"X-Request-ID": "client-id-7"})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("X-Request-ID") == "client-id-7"
        conn.request("POST", "/generate", b"{bad", headers={"X-Request-ID": "bad id with spaces"})
        resp = conn.getresponse()
        resp.read()
        minted = resp.getheader("X-Request-ID")
        conn.close()
    assert resp.status == 400 and minted and minted != "bad id with spaces"
    lines = [r.getMessage() for r in caplog.records if r.name == "r3.serve"]
    assert any(line.startswith("client-id-7 ") and "POST /generate -> 200" in line for line in lines)
    assert any(line.startswith(f"{minted} ") and "-> 400" in line for line in lines)


def test_compact_routes_on_request_and_the_backend_negotiates_them(serve, model):
    server = serve()
    client = HTTPClient(server.url, max_retries=0)
    wide = client.post_json("/generate", {**BODY, "return_routed_experts": True})
    compact = client.post_json("/generate", {**BODY, "return_routed_experts": True, "routed_experts_format": "r3"})
    assert compact["meta_info"]["routed_experts_format"] == "r3" and "routed_experts_format" not in wide["meta_info"]
    routes = RoutedExperts.from_base64(compact["meta_info"]["routed_experts"])
    assert routes.to_sglang(4) == wide["meta_info"]["routed_experts"]
    assert client.get_json("/get_model_info")["routed_experts_formats"] == ["sglang", "r3"]
    with SGLangBackend(url=server.url, model_path=model) as backend:
        assert backend.routes_format == "r3"
        (got,) = backend.generate([[1, 2, 3]], SamplingParams(3, temperature=0))
    assert got.routed_experts == routes


def test_an_empty_api_key_is_refused(engine, model, capsys):
    for key in ("", "  "):
        with pytest.raises(ValueError, match="API key must be a non-empty string"):
            R3Server(engine, model, port=0, api_key=key)
    from recipes.cli import main

    assert main(["serve", "--model", str(model), "--port", "0", "--api-key", ""]) != 0
    assert "--api-key must not be empty" in capsys.readouterr().err


class RouteFaultEngine(Engine):
    """The built-in engine with a fault in serving one prompt (its routes cannot be gathered)."""

    def _routes_of(self, r):
        if r.prompt_ids == [6, 6, 6]:
            raise OverflowError("injected fault")
        return super()._routes_of(r)


def test_a_fault_in_one_request_is_a_500_for_it_alone(serve, model):
    server = serve(engine=RouteFaultEngine(model))
    client = HTTPClient(server.url, max_retries=0)
    batch = {"input_ids": [[1, 2, 3], [6, 6, 6]], "sampling_params": {"max_new_tokens": 3}}
    with pytest.raises(RuntimeError, match="HTTP 500: request failed in the engine: OverflowError: injected fault"):
        client.post_json("/generate", batch)
    for _ in range(2):  # the engine keeps serving
        assert len(client.post_json("/generate", BODY)["output_ids"]) == 3
    assert client.request("GET", "/health", None) is None
