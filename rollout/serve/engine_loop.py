"""One thread that owns the engine; HTTP handler threads talk to it through a queue and futures.

The engine is not thread-safe and batches best when it sees every pending
request, so exactly one loop thread calls ``add_request`` / ``step``. Handlers
``submit`` work and wait on the returned ``Future``. A request the engine refuses
(``add_request`` raises) fails alone; so does one whose callback raises, or whose
caller gave up on its future. Only if ``step`` itself raises (the engine isolates
per-request faults, so this is the engine breaking) do the requests it held fail
with that error and the loop stop taking work (``healthy`` turns False), rather
than serving from a half-updated engine.

Streaming: a submission may carry ``on_tokens``; after every step the loop
reports the tokens its request has so far, from the engine's
``progress(rid) -> (output_ids, logprobs) | None``.

Control: ``call(fn)`` runs ``fn(engine)`` on the loop thread between two steps (weight
updates, cache flushes, memory release: ``rollout/serve/control.py``), and ``paused``
stops stepping while requests keep being admitted, as SGLang's ``/pause_generation``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from rollout.types import Rollout, SamplingParams

TokensCallback = Callable[[list[int], list[float]], None]


class StepEngine(Protocol):
    max_context: int  # prompt + output tokens one request may hold

    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, start_len: int = 0) -> int: ...
    def step(self) -> list[tuple[int, Rollout]]: ...
    def has_unfinished(self) -> bool: ...
    def abort(self, rid: int) -> None: ...
    def progress(self, rid: int) -> tuple[list[int], list[float]] | None: ...
    def take_finished(self) -> list[tuple[int, Rollout]]: ...


@dataclass
class _Submission:
    prompt_ids: list[int]
    sampling: SamplingParams
    start_len: int
    future: Future
    on_tokens: TokensCallback | None
    reported: int = 0  # output tokens already passed to on_tokens


@dataclass
class _Cancel:
    future: Future


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    future: Future


_STOP = object()


class EngineLoop:
    def __init__(self, engine: StepEngine) -> None:
        self._engine = engine
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._pending: dict[int, _Submission] = {}
        self._failure: BaseException | None = None
        self._closed = False  # set (under _lock) once the inbox is drained for good
        self.paused = False  # set only on the loop thread (through call())
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="r3-engine-loop", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        start_len: int = 0,
        on_tokens: TokensCallback | None = None,
    ) -> "Future[Rollout]":
        """Queue one request; ``on_tokens(output_ids, logprobs)`` (loop thread) sees each step's progress."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(self._stopped_error())
            else:
                self._inbox.put(_Submission(list(prompt_ids), sampling, start_len, future, on_tokens))
        return future

    def cancel(self, future: Future) -> None:
        """Abort the request behind ``future`` (its caller gave up): the engine stops spending steps on it."""
        self._inbox.put(_Cancel(future))

    def call(self, fn: Callable[[Any], Any]) -> "Future[Any]":
        """Run ``fn(engine)`` on the loop thread between steps; its result or exception lands in the future."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(self._stopped_error())
            else:
                self._inbox.put(_Call(fn, future))
        return future

    def stop(self, timeout: float | None = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    # -------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while True:
                # Block only when the engine has nothing to do; otherwise take what has arrived and step.
                if not self._admit(block=self.paused or not self._engine.has_unfinished()):
                    break
                if self._engine.has_unfinished() and not self.paused:
                    self._deliver(self._engine.step())
                    self._report_progress()
        except BaseException as exc:  # the engine broke: fail everyone waiting, stop taking work
            self._failure = exc
        finally:
            self._drain()

    def _deliver(self, finished: list[tuple[int, Rollout]]) -> None:
        for rid, rollout in finished:
            sub = self._pending.pop(rid, None)
            if sub is not None:
                _resolve(sub.future, result=rollout)

    def _admit(self, block: bool) -> bool:
        """Move queued submissions into the engine; False once stop() was called."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Cancel):
                self._abort(item.future)
                continue
            if item.future.done():  # its caller already gave up (cancelled the future)
                continue
            if isinstance(item, _Call):
                try:
                    _resolve(item.future, result=item.fn(self._engine))
                except ValueError as exc:  # a refused command (bad weights, busy engine): that caller's error only
                    _resolve(item.future, error=exc)
                except BaseException as exc:  # the engine broke: this caller hears it, then everyone does
                    _resolve(item.future, error=exc)
                    raise
                self._deliver(self._engine.take_finished())  # an update may have finished requests in flight
                continue
            try:
                rid = self._engine.add_request(item.prompt_ids, item.sampling, start_len=item.start_len)
            except Exception as exc:  # bad request for this engine: that caller's error only
                _resolve(item.future, error=exc)
                continue
            self._pending[rid] = item

    def _abort(self, future: Future) -> None:
        rid = next((rid for rid, sub in self._pending.items() if sub.future is future), None)
        if rid is None:  # it already finished
            return
        try:
            self._engine.abort(rid)
        except ValueError:  # finished inside the engine meanwhile: nothing left to stop
            pass

    def _report_progress(self) -> None:
        for rid, sub in self._pending.items():
            if sub.future.done():  # cancelled by its caller: stop spending steps on it
                self._abort(sub.future)
                continue
            so_far = self._engine.progress(rid) if sub.on_tokens is not None else None
            if so_far is not None and len(so_far[0]) > sub.reported:
                sub.reported = len(so_far[0])
                try:
                    sub.on_tokens(list(so_far[0]), list(so_far[1]))
                except Exception:  # that caller's listener broke (its event loop closed): it alone stops
                    sub.on_tokens = None
                    self._abort(sub.future)

    def _stopped_error(self) -> RuntimeError:
        if self._failure is not None:
            return RuntimeError(f"engine failed: {self._failure!r}")
        return RuntimeError("the engine loop has stopped")

    def _drain(self) -> None:
        reason = self._stopped_error()
        with self._lock:
            self._closed = True
        for sub in self._pending.values():
            _resolve(sub.future, error=reason)
        self._pending.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, (_Submission, _Call)):
                _resolve(item.future, error=reason)


def _resolve(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless its caller cancelled it first (then there is no one to tell)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
