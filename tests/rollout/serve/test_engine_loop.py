"""The engine-loop thread isolates its callers: one broken listener or abandoned future never stops it."""

from __future__ import annotations

import time

import pytest

from rollout.engine.engine import Engine
from rollout.serve.engine_loop import EngineLoop
from rollout.types import FINISH_ABORT, FINISH_LENGTH, SamplingParams

LONG = SamplingParams(max_new_tokens=400, temperature=0)
SHORT = SamplingParams(max_new_tokens=4, temperature=0)


@pytest.fixture
def loop(tiny_model_dir):
    engine = Engine(tiny_model_dir("tiny-qwen3-moe"))
    loop = EngineLoop(engine)
    yield loop, engine
    loop.stop()


def test_a_listener_that_raises_aborts_only_its_own_request(loop):
    loop, engine = loop

    def broken(ids, lps):
        raise RuntimeError("the listener's event loop is closed")

    bad = loop.submit([1, 2, 3], LONG, on_tokens=broken)
    good = loop.submit([4, 5, 6], SHORT, on_tokens=lambda ids, lps: None)
    assert good.result(60).finish_reason == FINISH_LENGTH
    aborted = bad.result(60)
    assert aborted.finish_reason == FINISH_ABORT and len(aborted.output_ids) < LONG.max_new_tokens
    assert loop.healthy and loop.submit([7, 8], SHORT).result(60).finish_reason == FINISH_LENGTH


def _wait(condition, seconds=30.0):
    deadline = time.perf_counter() + seconds
    while not condition() and time.perf_counter() < deadline:
        time.sleep(0.01)
    return condition()


def test_abandoned_futures_are_dropped_and_the_loop_goes_on(loop):
    """A caller that cancels its future (asyncio.wrap_future does when its task is cancelled) stops the request."""
    loop, engine = loop
    running = loop.submit([1, 2, 3], LONG)
    assert _wait(engine.has_unfinished)
    assert running.cancel()  # while the engine works on it
    assert _wait(lambda: not engine.has_unfinished())  # aborted within a step, not run for 400 tokens
    queued = [loop.submit([9, 9, 9], LONG) for _ in range(3)]
    for f in queued:
        f.cancel()  # before the loop admitted them, or right after
    assert loop.submit([7, 8], SHORT).result(60).finish_reason == FINISH_LENGTH
    assert _wait(lambda: not engine.has_unfinished()) and loop.healthy
