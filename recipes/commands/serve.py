"""``r3 serve --model DIR [--host H] [--port N] [--api-key KEY] [--device D] [--dtype T] [--no-capture]
[--request-timeout S] [--body-timeout S] [--max-connections N]``.

Puts the built-in engine behind SGLang's ``/generate`` protocol (FastAPI on
uvicorn, see ``rollout.serve.server``). Binds to loopback unless ``--host`` says
otherwise; ``--port 0`` picks a free port. The first line on stdout is
``r3 serve: listening on http://HOST:PORT`` so scripts and tests can read the
port; each request is logged on stderr with its request id. An empty
``--api-key`` is refused (it would silently turn authentication off).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from rollout.engine.config import AUTO, DTYPES
from rollout.serve.server import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT_S,
    LOOPBACK,
    open_server,
)

DEFAULT_PORT = 30000  # SGLang's default
LISTENING_PREFIX = "r3 serve: listening on "
_LOOPBACK_NAMES = (LOOPBACK, "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (see r3 init-model)")
    p.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=AUTO, choices=DTYPES + (AUTO,), help="auto: float32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument(
        "--no-capture", action="store_true",
        help="do not record routed experts (like SGLang without --enable-return-routed-experts)",
    )
    p.add_argument("--max-running-requests", type=int, default=None, help="engine batch limit")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds per request")
    p.add_argument(
        "--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a client has to send a request's head and body (408 and closed after)",
    )
    p.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
        help="connections and requests served at once; past it a client gets 503",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty (leave it out to serve without authentication)")
    options = {} if args.max_running_requests is None else {"max_running_requests": args.max_running_requests}
    server = open_server(
        args.model, host=args.host, port=args.port, api_key=args.api_key, capture=not args.no_capture,
        device=args.device, dtype=args.dtype, request_timeout=args.request_timeout, body_timeout=args.body_timeout,
        max_connections=args.max_connections, **options,
    )
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"{LISTENING_PREFIX}{server.url}", flush=True)
    if args.host not in _LOOPBACK_NAMES and not args.api_key:
        print(f"r3 serve: warning: listening on {args.host} without --api-key", file=sys.stderr, flush=True)
    # uvicorn catches SIGINT/SIGTERM while it serves, shuts down gracefully, then re-raises the signal:
    # these handlers take that re-raise, so the process ends through the shutdown below with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    print("r3 serve: stopped", file=sys.stderr, flush=True)
    return 0


def _ignore(signum: int, frame: object) -> None:
    pass
