"""A small JSON-over-HTTP client with keep-alive connections, retries and timeouts (stdlib only).

Each thread keeps its own ``http.client.HTTPConnection``: connections are not
thread-safe, and reusing one per worker thread avoids a TCP handshake per
request. Connection failures (refused, reset, a keep-alive socket the server
closed) and 502/503/504 are retried with exponential backoff; a 4xx is the
caller's fault and is raised at once as ``ValueError``; a read timeout is not
retried, since the server may still be working on the request. Generation has
no side effects, so re-sending a request whose connection broke is safe.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Any

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
_RETRY_STATUSES = frozenset({502, 503, 504})


class ServerError(RuntimeError):
    """The server failed (5xx) or could not be reached after every retry."""


class HTTPClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
    ) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server url must look like http://host:port, got {url!r}")
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("max_retries must be >= 0, timeout > 0 and backoff >= 0")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        self._base_path = parsed.path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._all_lock = threading.Lock()

    # ---------------------------------------------------------------- public
    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json.dumps(body).encode("utf-8"))

    def get_json(self, path: str) -> Any:
        return self.request("GET", path, None)

    def request(self, method: str, path: str, data: bytes | None, *, text: bool = False) -> Any:
        """Send one request; returns the decoded JSON body ("" bodies decode to None), or with ``text`` the body as text."""
        attempt = 0
        while True:
            try:
                status, raw = self._send(method, self._base_path + path, data)
            except socket.timeout:
                self._drop_connection()
                raise TimeoutError(f"{method} {self.url}{path}: no answer within {self.timeout:g}s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self._drop_connection()
                if attempt >= self.max_retries:
                    raise ServerError(
                        f"{method} {self.url}{path}: cannot reach the server after {attempt + 1} attempts: {exc!r}"
                    ) from exc
            else:
                if status < 400:
                    return raw.decode("utf-8", "replace") if text else _json_body(raw, f"{method} {self.url}{path}")
                message = _error_text(raw)
                if 400 <= status < 500:
                    raise ValueError(f"{method} {self.url}{path} -> HTTP {status}: {message}")
                if status not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise ServerError(f"{method} {self.url}{path} -> HTTP {status}: {message}")
            time.sleep(min(MAX_BACKOFF_S, self.backoff * 2**attempt))
            attempt += 1

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    # -------------------------------------------------------------- internal
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._all_lock:
                if conn in self._all:
                    self._all.remove(conn)

    def _send(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        conn = self._connection()
        conn.request(method, path, body=data, headers=self._headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.will_close:
            self._drop_connection()
        return resp.status, raw


def _json_body(raw: bytes, what: str) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{what}: the reply is not JSON ({exc}): {raw[:200]!r}") from None


def _error_text(raw: bytes) -> str:
    """SGLang errors are ``{"error": {"message": ...}}`` (or ``{"error": "..."}``); fall back to the raw text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500]
    err = body.get("error", body) if isinstance(body, dict) else body
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)
