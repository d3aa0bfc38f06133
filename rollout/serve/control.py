"""SGLang's weight, cache and memory endpoints for ``r3 serve``, on the built-in engine.

The routes, bodies and replies are SGLang 0.5.17's (``sglang/srt/entrypoints/http_server.py``
and ``managers/io_struct.py``), so ``SGLangBackend`` drives ``r3 serve`` and a real SGLang
server with the same code:

| route | body | what the built-in engine does |
|---|---|---|
| ``POST /update_weights_from_disk`` | ``model_path``, ``weight_version``, ``abort_all_requests``, ``flush_cache`` | reads ``*.safetensors`` under ``model_path`` (any subset of the model's tensors) and calls ``update_weights`` |
| ``POST /update_weights_from_tensor`` | ``serialized_named_tensors`` | refused (400): SGLang pickles tensors (CUDA IPC handles), and r3 takes no pickle across a process boundary |
| ``POST /update_weight_version`` | ``new_version``, ``abort_all_requests`` (default true) | an empty update: the version changes, caches are flushed |
| ``GET/POST /flush_cache`` | none | refused (400) while requests run or wait, as SGLang |
| ``POST /pause_generation`` | ``mode``: ``abort`` (default), ``retract``, ``in_place`` | stops stepping; ``abort`` first aborts every request |
| ``POST /continue_generation`` | ``torch_empty_cache`` (ignored) | steps again |
| ``GET/POST /release_memory_occupation`` | ``tags``: ``kv_cache``, ``weights`` (default both) | ``release_memory(weights=...)``; the KV pool always goes |
| ``GET/POST /resume_memory_occupation`` | ``tags`` | ``resume_memory()`` |

Requests in flight at a weight update: ``abort_all_requests`` aborts them; a paused server
(any mode) lets them continue on the new weights, retracted and recomputed, with per-token
versions (``in_flight="continue"``: old KV is never reused, unlike SGLang's ``in_place``);
otherwise they finish on the old weights first, as SGLang's update lock does.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from typing import Any, Callable, Mapping

from rollout.engine.models.loader import read_checkpoint_tensors
from rollout.serve.engine_loop import EngineLoop

PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("kv_cache", "weights")
CONTROL_TIMEOUT_S = 600.0

Reply = tuple[int, Any]  # (HTTP status, JSON payload; a str is sent as text/plain)


class EngineControl:
    """The handlers; each runs its engine work on the loop thread through ``EngineLoop.call``."""

    def __init__(self, loop: EngineLoop, timeout: float = CONTROL_TIMEOUT_S) -> None:
        self.loop = loop
        self.timeout = timeout

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        try:
            return self.loop.call(fn).result(timeout=self.timeout)
        except FutureTimeout:
            raise ValueError(f"the engine did not finish the command within {self.timeout:g}s") from None

    # ------------------------------------------------------------- weights
    def update_weights_from_disk(self, body: Any) -> Reply:
        body = _object(body)
        _only(body, {"model_path", "load_format", "abort_all_requests", "weight_version", "flush_cache",
                     "is_async", "torch_empty_cache", "keep_pause", "recapture_cuda_graph", "token_step", "rid"})
        path = _field(body, "model_path", str)
        load_format = body.get("load_format")
        if load_format not in (None, "auto", "safetensors"):
            return _failed(f"load_format {load_format!r} is not supported: r3 serve reads safetensors only")
        if body.get("flush_cache", True) is not True:
            return _failed("flush_cache=false is not supported: KV made with old weights would serve new requests")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            return _failed(f"weight_version must be a string, got {version!r}")
        abort = _flag(body, "abort_all_requests", False)
        try:
            tensors = read_checkpoint_tensors(path)
        except ValueError as exc:
            raise ValueError(f"model_path: {exc}") from None

        def update(engine: Any) -> tuple[str, int]:
            unfinished = len(engine._requests)
            mode = "abort" if abort else "continue" if self.loop.paused else "finish"
            engine.update_weights(tensors, engine.weight_version if version is None else version, in_flight=mode)
            return mode, unfinished if mode == "continue" else 0

        mode, paused = self._run(update)
        message = f"Succeeded to update model weights ({len(tensors)} tensors; requests in flight: {mode})."
        if version is not None:
            message += f" Weight version updated to {version}."
        return HTTPStatus.OK, {"success": True, "message": message, "num_paused_requests": paused}

    def update_weights_from_tensor(self, body: Any) -> Reply:
        return _failed(
            "r3 serve does not accept serialized tensors: SGLang's format is a pickle of CUDA IPC handles, and r3 "
            "never unpickles across a process boundary; write safetensors and use /update_weights_from_disk"
        )

    def update_weight_version(self, body: Any) -> Reply:
        body = _object(body)
        _only(body, {"new_version", "abort_all_requests", "rid"})
        version = _field(body, "new_version", str)
        abort = _flag(body, "abort_all_requests", True)
        self._run(lambda engine: engine.update_weights({}, version, in_flight="abort" if abort else "finish"))
        return HTTPStatus.OK, {"success": True, "message": f"Weight version updated to {version}",
                               "new_version": version}

    # -------------------------------------------------------------- caches
    def flush_cache(self, body: Any) -> Reply:
        def flush(engine: Any) -> int:
            if engine.has_unfinished():
                return len(engine._requests)
            engine.flush_cache()
            return 0

        busy = self._run(flush)
        if busy:
            return HTTPStatus.BAD_REQUEST, f"Cache not flushed: {busy} requests are running or waiting.\n"
        return HTTPStatus.OK, "Cache flushed.\n"

    # --------------------------------------------------------- generation
    def pause_generation(self, body: Any) -> Reply:
        body = _object(body, empty_ok=True)
        _only(body, {"mode", "rid"})
        mode = body.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")

        def pause(engine: Any) -> None:
            self.loop.paused = True
            if mode == "abort":
                for rid in list(engine._requests):
                    engine.abort(rid)
                while engine.has_unfinished():  # aborted requests leave once their steps are done
                    self.loop._deliver(engine.step())

        self._run(pause)
        return HTTPStatus.OK, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: Any) -> Reply:
        _only(_object(body, empty_ok=True), {"torch_empty_cache", "rid"})
        self._run(lambda engine: setattr(self.loop, "paused", False))
        return HTTPStatus.OK, {"message": "Generation continued successfully.", "status": "ok"}

    # -------------------------------------------------------------- memory
    def release_memory_occupation(self, body: Any) -> Reply:
        tags = _tags(body)
        self._run(lambda engine: engine.release_memory(weights="weights" in tags))
        return HTTPStatus.OK, None

    def resume_memory_occupation(self, body: Any) -> Reply:
        _tags(body)
        self._run(lambda engine: engine.resume_memory())
        return HTTPStatus.OK, None


# (method, path) -> handler name; r3 serve's HTTP layer dispatches through this table
ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/update_weights_from_disk"): "update_weights_from_disk",
    ("POST", "/update_weights_from_tensor"): "update_weights_from_tensor",
    ("POST", "/update_weight_version"): "update_weight_version",
    ("GET", "/flush_cache"): "flush_cache",
    ("POST", "/flush_cache"): "flush_cache",
    ("POST", "/pause_generation"): "pause_generation",
    ("POST", "/continue_generation"): "continue_generation",
    ("GET", "/release_memory_occupation"): "release_memory_occupation",
    ("POST", "/release_memory_occupation"): "release_memory_occupation",
    ("GET", "/resume_memory_occupation"): "resume_memory_occupation",
    ("POST", "/resume_memory_occupation"): "resume_memory_occupation",
}


def handle(control: EngineControl, method: str, path: str, body: Any) -> Reply:
    """One control request; a bad body or a refused command is a 400 with SGLang's ``success``/``message``."""
    try:
        return getattr(control, ROUTES[(method, path)])(body)
    except ValueError as exc:
        return _failed(str(exc))


# ------------------------------------------------------------------- helpers
def _failed(message: str) -> Reply:
    return HTTPStatus.BAD_REQUEST, {"success": False, "message": message}


def _object(body: Any, empty_ok: bool = False) -> Mapping[str, Any]:
    if body is None and empty_ok:
        return {}
    if not isinstance(body, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _only(body: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(known)}")


def _field(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is str and not value):
        raise ValueError(f"{key} must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _tags(body: Any) -> tuple[str, ...]:
    body = _object(body, empty_ok=True)
    _only(body, {"tags", "rid"})
    tags = body.get("tags")
    if tags is None:
        return MEMORY_TAGS
    if not isinstance(tags, list) or not tags or any(t not in MEMORY_TAGS for t in tags):
        raise ValueError(f"tags must be a non-empty list of {list(MEMORY_TAGS)}, got {tags!r}")
    return tuple(tags)
