"""Keep-alive, retries and timeouts of the HTTP client, against a real scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout.sglang.http_client import HTTPClient, ServerError


class ScriptedServer:
    """Answers POSTs with the next (status, body, delay) of a script; records calls and client ports."""

    def __init__(self, script, port=0):
        self.script = list(script)
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization")
                outer.calls.append({"port": self.client_address[1], "auth": auth, "body": json.loads(body)})
                status, payload, delay = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                time.sleep(delay)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # the timeout test hangs up on purpose
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_keep_alive_reuses_one_connection_per_thread(serve):
    server = serve((200, {"ok": 1}, 0))
    client = HTTPClient(server.url, api_key="secret")
    for i in range(5):
        assert client.post_json("/generate", {"i": i}) == {"ok": 1}
    assert len({c["port"] for c in server.calls}) == 1
    assert [c["body"]["i"] for c in server.calls] == list(range(5))
    assert {c["auth"] for c in server.calls} == {"Bearer secret"}
    threads = [threading.Thread(target=client.post_json, args=("/generate", {"i": 9})) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({c["port"] for c in server.calls}) == 4  # one more connection per new thread
    client.close()


def test_unavailable_is_retried_with_backoff(serve):
    server = serve((503, {"error": "busy"}, 0), (503, {"error": "busy"}, 0), (200, {"ok": 2}, 0))
    client = HTTPClient(server.url, backoff=0.01)
    assert client.post_json("/generate", {}) == {"ok": 2}
    assert len(server.calls) == 3


def test_client_errors_are_not_retried(serve):
    server = serve((400, {"error": {"message": "input_ids[0] = 999 is outside the vocabulary"}}, 0))
    client = HTTPClient(server.url, backoff=0.01)
    with pytest.raises(ValueError, match="HTTP 400: input_ids\\[0\\] = 999 is outside"):
        client.post_json("/generate", {})
    assert len(server.calls) == 1


def test_server_errors_are_raised_without_retry(serve):
    server = serve((500, {"error": {"message": "engine failed"}}, 0))
    with pytest.raises(ServerError, match="HTTP 500: engine failed"):
        HTTPClient(server.url, backoff=0.01).post_json("/generate", {})
    assert len(server.calls) == 1


def test_unreachable_server_fails_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = HTTPClient(f"http://127.0.0.1:{port}", max_retries=3, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match="after 4 attempts"):
        client.post_json("/generate", {})
    assert time.perf_counter() - t0 >= 0.01 + 0.02 + 0.04


def test_server_that_comes_up_late_is_reached():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = HTTPClient(f"http://127.0.0.1:{port}", max_retries=8, backoff=0.05)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("reply", client.post_json("/generate", {})))
    t.start()
    time.sleep(0.2)
    server = ScriptedServer([(200, {"late": True}, 0)], port=port)
    t.join(10)
    server.close()
    assert result["reply"] == {"late": True}


def test_read_timeout_is_not_retried(serve):
    server = serve((200, {"slow": 1}, 0.5))
    client = HTTPClient(server.url, timeout=0.1, backoff=0.01)
    with pytest.raises(TimeoutError, match="no answer within 0.1s"):
        client.post_json("/generate", {})
    assert len(server.calls) == 1


def test_bad_urls():
    with pytest.raises(ValueError, match="http://host:port"):
        HTTPClient("ftp://x")
    assert HTTPClient("127.0.0.1:30000").url == "http://127.0.0.1:30000"
