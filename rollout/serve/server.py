"""The built-in engine behind SGLang's HTTP protocol (``/generate``, ``/health``, ``/get_model_info``).

Stdlib only: ``ThreadingHTTPServer`` gives each connection a thread that
parses, validates and waits; one ``EngineLoop`` thread owns the engine. HTTP/1.1
keep-alive is on, so the SGLang backend's pooled connections are reused. Every
bad request gets a 4xx with SGLang's error shape and the server keeps serving;
a request whose body was not read closes its connection so the stream stays in sync.
"""

from __future__ import annotations

import hmac
import itertools
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from rollout.moe_spec import MoESpec, read_config
from rollout.serve import control
from rollout.serve.engine_loop import EngineLoop, StepEngine
from rollout.sglang.protocol import (
    DEFAULT_WEIGHT_VERSION,
    SGLANG_WIRE_VERSION,
    GenerateRequest,
    build_partial_reply,
    build_reply,
    error_body,
    parse_request,
)

MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 600.0
LOOPBACK = "127.0.0.1"


def open_server(
    model_path: str | os.PathLike,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    api_key: str | None = None,
    capture: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    **engine_options: Any,
) -> "R3Server":
    """Load the built-in engine on ``model_path`` and bind the server (not yet serving)."""
    from rollout.engine.engine import Engine

    engine = Engine(model_path, device=device, dtype=dtype, return_routed_experts=capture, **engine_options)
    return R3Server(
        engine, model_path, host=host, port=port, api_key=api_key, capture=capture, request_timeout=request_timeout
    )


class R3Server:
    """Owns the HTTP server and the engine loop; ``serve_forever`` blocks, ``shutdown`` stops both."""

    def __init__(
        self,
        engine: StepEngine,
        model_path: str | os.PathLike,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        api_key: str | None = None,
        capture: bool = True,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.model_path = str(model_path)
        self.config: dict[str, Any] = read_config(self.model_path)
        self.spec = MoESpec.from_config(self.config)
        self.vocab_size = int(self.config["vocab_size"])
        self.max_seq_len = int(engine.max_context)
        self.capture = capture
        self.api_key = api_key
        self.request_timeout = request_timeout
        try:
            self.httpd = _QuietHTTPServer((host, port), _make_handler(self))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.engine = engine
        self.loop = EngineLoop(engine)
        self.control = control.EngineControl(self.loop, timeout=request_timeout)  # SGLang's weight/memory verbs

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="r3-http", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.stop()

    # -------------------------------------------------------------- handlers
    def parse(self, body: Any) -> GenerateRequest:
        return parse_request(body, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def generate(self, request: GenerateRequest) -> tuple[int, Any]:
        """Run every item of ``request``; (HTTP status, SGLang reply or list of replies)."""
        started = time.perf_counter()
        futures = [self.loop.submit(it.prompt_ids, it.sampling, it.start_len) for it in request.items]
        replies = []
        for item, future in zip(request.items, futures):
            try:
                rollout = future.result(timeout=max(0.0, started + self.request_timeout - time.perf_counter()))
            except Exception as exc:
                for other in futures:
                    self.loop.cancel(other)
                return _failure(exc, self.request_timeout)
            latency = time.perf_counter() - started
            replies.append(build_reply(item, rollout, self.spec, capture=self.capture, e2e_latency=latency))
        return HTTPStatus.OK, (replies if request.is_batch else replies[0])

    def stream(self, request: GenerateRequest) -> Iterator[tuple[int, Any]]:
        """(status, chunk) pairs: cumulative partial replies after each engine step, then the full reply.

        A failure before the first chunk comes as a 4xx/5xx pair so the handler can
        still answer with a plain error; after that it comes as an SGLang error chunk.
        """
        if request.is_batch:
            raise ValueError("stream=true takes a single prompt (input_ids as one list of token ids)")
        (item,) = request.items
        started = time.perf_counter()
        events: queue.Queue[tuple[list[int], list[float]] | None] = queue.Queue()
        future = self.loop.submit(
            item.prompt_ids, item.sampling, item.start_len, on_tokens=lambda ids, lps: events.put((ids, lps))
        )
        future.add_done_callback(lambda _: events.put(None))
        try:
            while True:
                try:
                    event = events.get(timeout=max(0.0, started + self.request_timeout - time.perf_counter()))
                except queue.Empty:
                    yield _failure(FutureTimeout(), self.request_timeout)
                    return
                if event is None:
                    break
                yield HTTPStatus.OK, build_partial_reply(item, *event, weight_version=self.weight_version)
        finally:  # timed out, or the client hung up mid-stream (the handler closes this generator)
            if not future.done():
                self.loop.cancel(future)
        try:
            rollout = future.result(timeout=0)
        except Exception as exc:
            yield _failure(exc, self.request_timeout)
            return
        latency = time.perf_counter() - started
        yield HTTPStatus.OK, build_reply(item, rollout, self.spec, capture=self.capture, e2e_latency=latency)

    @property
    def weight_version(self) -> str:
        """The engine's weight version as SGLang spells it (a string; "default" before any update)."""
        version = getattr(self.engine, "weight_version", None)
        return DEFAULT_WEIGHT_VERSION if version is None else str(version)

    def model_info(self) -> dict[str, Any]:
        """SGLang's ``/model_info`` keys, plus what r3 adds (``sglang_wire_version``, ``capture``)."""
        return {
            "model_path": self.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": self.spec.model_type,
            "architectures": self.config.get("architectures"),
            "sglang_wire_version": SGLANG_WIRE_VERSION,
            "capture": self.capture,
        }


def _failure(exc: BaseException, timeout: float) -> tuple[int, Any]:
    """The HTTP answer for a request the engine did not complete."""
    if isinstance(exc, FutureTimeout):
        return HTTPStatus.GATEWAY_TIMEOUT, error_body(f"no result within {timeout:g}s")
    if isinstance(exc, ValueError):  # the engine refused this prompt
        return HTTPStatus.BAD_REQUEST, error_body(str(exc))
    return HTTPStatus.SERVICE_UNAVAILABLE, error_body(str(exc))


class _QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-reply is routine under load; anything else still gets a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(server: R3Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        server_version = "r3-serve"

        def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise under load
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":  # unauthenticated, like SGLang, so orchestrators can probe it
                if server.loop.healthy:
                    self._send(HTTPStatus.OK, b"", "text/plain")
                else:
                    self._json(HTTPStatus.SERVICE_UNAVAILABLE, error_body("the engine loop has stopped"))
            elif not self._authorized():
                return
            elif path in ("/model_info", "/get_model_info"):  # 0.5.17's name, and the one it deprecates
                self._json(HTTPStatus.OK, server.model_info())
            elif ("GET", path) in control.ROUTES:
                self._control("GET", path, None)
            else:
                self._json(HTTPStatus.NOT_FOUND, error_body(f"no such endpoint: GET {path}"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/generate" and ("POST", path) not in control.ROUTES:
                self.close_connection = True
                self._json(HTTPStatus.NOT_FOUND, error_body(f"no such endpoint: POST {path}"))
                return
            if not self._authorized():
                return
            body = self._read_body()
            if body is None:
                return
            if path != "/generate":
                try:
                    parsed_control = json.loads(body) if body.strip() else None
                except (UnicodeDecodeError, ValueError) as exc:
                    self._json(HTTPStatus.BAD_REQUEST, error_body(f"request body is not valid JSON: {exc}"))
                    return
                self._control("POST", path, parsed_control)
                return
            try:
                parsed = json.loads(body)
            except (UnicodeDecodeError, ValueError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, error_body(f"request body is not valid JSON: {exc}"))
                return
            try:
                request = server.parse(parsed)
                if request.stream:
                    self._send_stream(server.stream(request))
                    return
            except ValueError as exc:
                self._json(HTTPStatus.BAD_REQUEST, error_body(str(exc)))
                return
            try:
                self._json(*server.generate(request))
            except RuntimeError as exc:  # the engine broke a promise (routes missing or misaligned)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, error_body(str(exc)))

        # ------------------------------------------------------------ helpers
        def _control(self, method: str, path: str, body: Any) -> None:
            """A weight/cache/memory command (rollout/serve/control.py); text replies go as text/plain."""
            try:
                status, payload = control.handle(server.control, method, path, body)
            except Exception as exc:  # the engine broke while running the command
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, error_body(f"engine failed: {exc!r}"))
                return
            if isinstance(payload, str):
                self._send(status, payload.encode("utf-8"), "text/plain")
            else:
                self._json(status, payload)

        def _authorized(self) -> bool:
            if not server.api_key:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return True
            self.close_connection = True
            self._json(HTTPStatus.UNAUTHORIZED, error_body("missing or wrong API key (Authorization: Bearer KEY)"))
            return False

        def _read_body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                message = "chunked bodies are not accepted; send Content-Length"
                self._json(HTTPStatus.LENGTH_REQUIRED, error_body(message))
                return None
            length_text = self.headers.get("Content-Length")
            try:
                length = int(length_text) if length_text is not None else -1
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._json(HTTPStatus.LENGTH_REQUIRED, error_body("a valid Content-Length header is required"))
                return None
            if length > MAX_BODY_BYTES:
                self.close_connection = True  # the body stays unread: this connection cannot be reused
                self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    error_body(f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}"),
                )
                return None
            return self.rfile.read(length)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def _send_stream(self, chunks: Iterator[tuple[int, Any]]) -> None:
            """SSE as SGLang's ``stream=true``: ``data: {...}`` per chunk, then ``data: [DONE]``; HTTP chunked."""
            status, first = next(chunks)
            if status != HTTPStatus.OK:
                self._json(status, first)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _, chunk in itertools.chain([(status, first)], chunks):
                    self._write_chunk(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")
            finally:  # also when the client hangs up: closing the generator cancels the request
                chunks.close()
            self._write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _write_chunk(self, data: bytes) -> None:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

    return Handler
