"""The built-in engine behind SGLang's HTTP protocol (``/generate``, ``/health``, ``/get_model_info``).

FastAPI on uvicorn, SGLang's own stack. Each connection is a coroutine, not a
thread, so hundreds of clients cost little; one ``EngineLoop`` thread owns the
engine and the handlers wait on its futures. What a production server needs:

* **bounded concurrency**: at most ``max_connections`` connections and requests
  (uvicorn's ``limit_concurrency``); past that a client gets 503 at once;
* **a listen backlog** of ``backlog`` (2048), so a burst of fresh connections queues
  in the kernel instead of being reset;
* **deadlines for slow clients**: a request's head and body must arrive within
  ``body_timeout`` (a client that sends fewer bytes than its Content-Length gets
  408 and its connection closed); idle keep-alive connections close after
  ``KEEP_ALIVE_S``; headers are capped at ``MAX_HEADER_BYTES``; a connection is
  closed by half-closing and draining, so the client reads the reply instead of
  a reset;
* **size limits**: bodies over ``MAX_BODY_BYTES`` get 413 before they are read;
* **every bad request a 4xx JSON error** in SGLang's shape naming the problem
  (strict pydantic models in ``rollout.sglang.protocol``), never a dropped connection;
* **streaming** as SGLang's ``stream=true`` (SSE ``data: {...}`` chunks, then
  ``data: [DONE]``); a client that disconnects, mid-stream or while waiting for a
  non-streamed reply, has its request aborted in the engine;
* **one log line per request** with a request id (``X-Request-ID``, taken from the
  client when it sends a sane one, echoed in the reply);
* an API key that, when set, must be non-empty.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator

import pydantic_core
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from rollout.moe_spec import MoESpec, read_config
from rollout.serve import control
from rollout.serve.engine_loop import EngineLoop, StepEngine
from rollout.sglang.protocol import (
    DEFAULT_WEIGHT_VERSION,
    ROUTES_FORMATS,
    SGLANG_WIRE_VERSION,
    GenerateItem,
    GenerateRequest,
    build_partial_reply,
    build_reply,
    error_body,
    parse_request,
)
from rollout.types import ERROR_META_KEY, Rollout

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_BACKLOG = 2048
KEEP_ALIVE_S = 5
LOOPBACK = "127.0.0.1"
REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the reply": logged, never sent
log = logging.getLogger("r3.serve")


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
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    **engine_options: Any,
) -> "R3Server":
    """Load the built-in engine on ``model_path`` and bind the server (not yet serving)."""
    from rollout.engine.engine import Engine

    _check_api_key(api_key)
    engine = Engine(model_path, device=device, dtype=dtype, return_routed_experts=capture, **engine_options)
    return R3Server(
        engine, model_path, host=host, port=port, api_key=api_key, capture=capture, request_timeout=request_timeout,
        body_timeout=body_timeout, max_connections=max_connections,
    )


class R3Server:
    """Owns the listening socket, the uvicorn server and the engine loop; ``serve_forever`` blocks, ``shutdown`` stops all."""

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
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        _check_api_key(api_key)
        for name, value in (("request_timeout", request_timeout), ("body_timeout", body_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if max_connections < 1 or backlog < 1:
            raise ValueError(f"max_connections and backlog must be >= 1, got {max_connections} and {backlog}")
        self.model_path = str(model_path)
        self.config: dict[str, Any] = read_config(self.model_path)
        self.spec = MoESpec.from_config(self.config)
        self.vocab_size = int(self.config["vocab_size"])
        self.max_seq_len = int(engine.max_context)
        self.capture = capture
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.body_timeout = body_timeout
        self._sock = _listen(host, port, backlog)
        self.engine = engine
        self.loop = EngineLoop(engine)
        self.control = control.EngineControl(self.loop, timeout=request_timeout)  # SGLang's weight/memory verbs
        config = uvicorn.Config(
            _make_app(self), http=_deadline_protocol(body_timeout), lifespan="off", access_log=False,
            log_config=None, timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections, backlog=backlog,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self._sock.getsockname()[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until ``shutdown`` (or, on the main thread, SIGINT/SIGTERM, which uvicorn handles)."""
        self._uvicorn.run(sockets=[self._sock])

    def start_background(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="r3-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise RuntimeError("the HTTP server did not start within 30 s")
        return self._thread

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._sock.close()
        self.loop.stop()

    # -------------------------------------------------------------- handlers
    def parse(self, body: bytes) -> GenerateRequest:
        return parse_request(body, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def generate(self, request: Request, gen: GenerateRequest) -> Response:
        """Run every item; the reply (or list of replies), or the first failure. A client that hangs up aborts all."""
        started = time.perf_counter()
        futures = [self.loop.submit(it.prompt_ids, it.sampling, it.start_len) for it in gen.items]
        results = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        hangup = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({results, hangup}, timeout=self.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if results not in done:
            results.cancel()
            for f in futures:
                self.loop.cancel(f)
            if hangup in done:
                return _error(CLIENT_CLOSED, "the client closed the connection")
            return _error(504, f"no result within {self.request_timeout:g}s")
        try:
            rollouts = results.result()
        except Exception as exc:
            return _failure(exc)
        latency = time.perf_counter() - started
        replies = []
        for item, rollout in zip(gen.items, rollouts):
            if ERROR_META_KEY in rollout.meta:
                return _error(500, rollout.meta[ERROR_META_KEY])
            replies.append(build_reply(item, rollout, self.spec, capture=self.capture, e2e_latency=latency))
        return JSONResponse(replies if gen.is_batch else replies[0])

    async def stream(self, gen: GenerateRequest) -> Response:
        """SSE as SGLang's ``stream=true``; a failure before the first chunk is a plain JSON error."""
        if gen.is_batch:
            return _error(400, "stream=true takes a single prompt (input_ids as one list of token ids)")
        (item,) = gen.items
        chunks = self._chunks(item)
        status, first = await chunks.__anext__()
        if status != 200:
            await chunks.aclose()
            return _error(status, first)
        return _EventStream(first, chunks)

    async def _chunks(self, item: GenerateItem) -> AsyncIterator[tuple[int, Any]]:
        """(status, chunk): cumulative partial replies after each engine step, then the full reply or an error."""
        started = time.perf_counter()
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[list[int], list[float]] | None] = asyncio.Queue()
        future = self.loop.submit(
            item.prompt_ids, item.sampling, item.start_len,
            on_tokens=lambda ids, lps: aloop.call_soon_threadsafe(events.put_nowait, (ids, lps)),
        )
        future.add_done_callback(lambda _: aloop.call_soon_threadsafe(events.put_nowait, None))
        try:
            while True:
                remaining = started + self.request_timeout - time.perf_counter()
                try:
                    event = await asyncio.wait_for(events.get(), timeout=max(0.0, remaining))
                except asyncio.TimeoutError:
                    yield 504, f"no result within {self.request_timeout:g}s"
                    return
                if event is None:
                    break
                yield 200, build_partial_reply(item, *event, weight_version=self.weight_version)
            try:
                rollout: Rollout = future.result(timeout=0)
            except Exception as exc:
                yield _failure_status(exc), str(exc)
                return
            if ERROR_META_KEY in rollout.meta:
                yield 500, rollout.meta[ERROR_META_KEY]
                return
            latency = time.perf_counter() - started
            yield 200, build_reply(item, rollout, self.spec, capture=self.capture, e2e_latency=latency)
        finally:  # timed out, failed, or the client hung up mid-stream (the response closes this generator)
            if not future.done():
                self.loop.cancel(future)

    @property
    def weight_version(self) -> str:
        """The engine's weight version as SGLang spells it (a string; "default" before any update)."""
        version = getattr(self.engine, "weight_version", None)
        return DEFAULT_WEIGHT_VERSION if version is None else str(version)

    def model_info(self) -> dict[str, Any]:
        """SGLang's ``/model_info`` keys, plus what r3 adds (wire version, capture, route formats)."""
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
            "routed_experts_formats": list(ROUTES_FORMATS) if self.capture else [],
        }


# ----------------------------------------------------------------- the app
class _HTTPError(Exception):
    """An answer for a request that cannot go on; ``close`` when its body was not read (the stream is out of sync)."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _make_app(server: R3Server) -> "_RequestLog":
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError) -> Response:
        return _error(exc.status, exc.message, close=exc.close)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(404, f"no such endpoint: {request.method} {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return _error(CLIENT_CLOSED, "the client closed the connection mid-request")

    @app.get("/health")
    async def health() -> Response:  # unauthenticated, like SGLang, so orchestrators can probe it
        if server.loop.healthy:
            return Response(b"", media_type="text/plain")
        return _error(503, "the engine loop has stopped")

    @app.get("/model_info")
    @app.get("/get_model_info")  # 0.5.17's name for it, which it deprecates
    async def get_model_info(request: Request) -> Response:
        _require_key(server, request)
        return JSONResponse(server.model_info())

    async def control_route(request: Request) -> Response:
        """A weight/cache/memory command (``rollout/serve/control.py``), run on the engine loop between steps."""
        _require_key(server, request)
        raw = await _read_body(request, MAX_BODY_BYTES, server.body_timeout)
        try:  # pydantic's parser, as for /generate: bounded nesting and numbers
            body = pydantic_core.from_json(raw) if raw.strip() else None
        except ValueError as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        try:  # blocks until the loop thread has run it, so off the event loop
            status, payload = await asyncio.to_thread(control.handle, server.control, request.method, request.url.path, body)
        except Exception as exc:  # the engine broke while running the command
            return _error(503, f"engine failed: {exc!r}")
        if isinstance(payload, str):
            return Response(payload.encode("utf-8"), status_code=status, media_type="text/plain")
        return JSONResponse(payload, status_code=status)

    for method, path in control.ROUTES:
        app.add_api_route(path, control_route, methods=[method])

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        _require_key(server, request)
        raw = await _read_body(request, MAX_BODY_BYTES, server.body_timeout)
        try:
            gen = server.parse(raw)
        except ValueError as exc:
            return _error(400, str(exc))
        if gen.stream:
            return await server.stream(gen)
        return await server.generate(request, gen)

    return _RequestLog(app)


class _RequestLog:
    """ASGI middleware: a request id for every request and one log line when its reply ends (streams included)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        started, status, sent = time.perf_counter(), [0], [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]}
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %s:%s %s %s -> %s %dB %.1fms", rid, client[0], client[1], scope["method"], scope["path"],
                status[0] or CLIENT_CLOSED, sent[0], 1000 * (time.perf_counter() - started),
            )


def _require_key(server: R3Server, request: Request) -> None:
    if not server.authorized(request):
        raise _HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", close=True)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, within ``limit`` bytes and ``timeout`` seconds, or the 4xx that says why not."""
    length = request.headers.get("content-length")
    if length is None and "transfer-encoding" not in request.headers:
        raise _HTTPError(411, "a Content-Length header (or chunked transfer encoding) is required", close=True)
    if length is not None and int(length) > limit:  # h11 already refused a malformed Content-Length
        raise _HTTPError(413, f"request body of {length} bytes exceeds the limit of {limit}", close=True)

    async def read() -> bytes:
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"request body exceeds the limit of {limit} bytes", close=True)
            parts.append(chunk)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise _HTTPError(408, f"request body not received within {timeout:g}s", close=True) from None


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next ASGI message is the hang-up)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(first: Any, rest: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[bytes]:
    """``data: {...}`` per chunk, then ``data: [DONE]``; a failure after the first chunk is SGLang's error chunk."""
    yield b"data: " + json.dumps(first).encode("utf-8") + b"\n\n"
    async for status, chunk in rest:
        yield b"data: " + json.dumps(chunk if status == 200 else error_body(chunk)).encode("utf-8") + b"\n\n"
    yield b"data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that closes its chunk generator however the response ends, so a hang-up aborts the request."""

    def __init__(self, first: Any, chunks: AsyncIterator[tuple[int, Any]]) -> None:
        self._chunks = chunks
        super().__init__(_sse(first, chunks), media_type="text/event-stream")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._chunks.aclose()


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"connection": "close"} if close else None
    return JSONResponse(error_body(message), status_code=status, headers=headers)


def _failure_status(exc: BaseException) -> int:
    """The HTTP status of a request the engine did not complete: 400 for a prompt it refused, else 503."""
    return 400 if isinstance(exc, ValueError) else 503


def _failure(exc: BaseException) -> Response:
    return _error(_failure_status(exc), str(exc))


# ------------------------------------------------------------ the transport
def _check_api_key(api_key: str | None) -> None:
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("the API key must be a non-empty string; leave it out to serve without authentication")


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening socket (bound here so a busy port is a clear error before anything starts)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _deadline_protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head, and closes that never reset.

    uvicorn closes idle keep-alive connections, but a client that sends part of a
    request head and stops holds its connection forever; this closes it after
    ``head_timeout`` (the body has its own deadline in ``_read_body``). Closing a
    socket whose client is still sending makes the kernel answer with a reset, which
    can destroy the reply (a 413, a 408) before the client reads it; so every close
    half-closes first and discards what still arrives, for at most ``LINGER_S``.
    """

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_LingeringTransport(transport))  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self.transport.lingering:  # type: ignore[attr-defined]
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self.transport.forget()  # type: ignore[attr-defined]
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(head_timeout, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # still no complete request head
                self.transport.close()

    return DeadlineH11Protocol


LINGER_S = 2.0


class _LingeringTransport:
    """An asyncio transport whose ``close`` sends the reply and a FIN, drains the client, then closes (no reset)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after the buffered reply; the client reads it, then sees the end
        self._transport.resume_reading()  # keep draining what it still sends, so closing never resets
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self._transport.close)

    def forget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
