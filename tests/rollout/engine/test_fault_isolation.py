"""One request never poisons the engine: bad values are refused alone, faults inside step() fail one request.

Each test puts a real fault into one request of a batch (a value set around SamplingParams'
checks, an exception raised while serving that request, a failed launch) and checks that
the other requests come back exactly as they do alone, that nothing stays queued, and that
the engine serves correctly afterwards. Aborts of requests never scheduled cost no compute.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.engine.engine import Engine
from rollout.types import ERROR_META_KEY, FINISH_ABORT, FINISH_LENGTH, SamplingParams

# R3_FUZZ_SCALE=100 turns the bounded fuzz test below into the long campaign (docs/benchmarks.md, issue 14).
FUZZ_SCALE = int(os.environ.get("R3_FUZZ_SCALE", "1"))
GREEDY = SamplingParams(max_new_tokens=5, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=20, seed=7)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


@pytest.fixture(scope="module")
def alone(qwen3_dir):
    """Each prompt's rollout with no other request in the engine."""
    engine = Engine(qwen3_dir)
    return [engine.generate([p], s)[0] for p, s in zip(PROMPTS, [GREEDY, SAMPLED, GREEDY])]


def _same(a, b):
    assert (a.output_ids, a.finish_reason) == (b.output_ids, b.finish_reason)
    assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-5)
    assert a.routed_experts == b.routed_experts


def _bypassed(**fields) -> SamplingParams:
    """A SamplingParams whose fields were set around its checks (as a buggy caller or a pickle could)."""
    sp = SamplingParams(max_new_tokens=5, temperature=0)
    for name, value in fields.items():
        object.__setattr__(sp, name, value)
    return sp


@pytest.mark.parametrize("fields", [{"seed": 2**64}, {"top_k": 2**63}, {"temperature": float("nan")},
                                    {"max_new_tokens": None}, {"stop_token_ids": None}])
def test_a_value_set_around_the_checks_is_refused_alone(qwen3_dir, alone, fields):
    engine = Engine(qwen3_dir)
    running = engine.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="prompt 1: " + next(iter(fields))):
        engine.generate([PROMPTS[1], PROMPTS[2]], [SAMPLED, _bypassed(**fields)])
    with pytest.raises(ValueError, match=next(iter(fields))):
        engine.add_request(PROMPTS[2], _bypassed(**fields))
    done = {}
    while engine.has_unfinished():  # only the request added before: nothing of the refused call was queued
        done.update(engine.step())
    assert list(done) == [running]
    _same(done[running], alone[0])
    _same(engine.generate([PROMPTS[1]], SAMPLED)[0], alone[1])


class RouteFaultEngine(Engine):
    """The built-in engine with a fault in serving one request: gathering the routes of prompt ``bad`` raises."""

    bad: list[int] = []

    def _routes_of(self, r):
        if r.prompt_ids == self.bad:
            raise OverflowError("injected fault in this request's routes")
        return super()._routes_of(r)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_fault_inside_step_fails_that_request_alone(qwen3_dir, alone, overlap):
    engine = RouteFaultEngine(qwen3_dir, overlap=overlap)
    engine.bad = PROMPTS[1]
    out = engine.generate(PROMPTS, [GREEDY, SAMPLED, GREEDY])
    assert out[1].finish_reason == FINISH_ABORT and out[1].routed_experts is None
    assert "OverflowError: injected fault in this request's routes" in out[1].meta[ERROR_META_KEY]
    _same(out[0], alone[0])
    _same(out[2], alone[2])
    assert not engine.has_unfinished()
    assert engine.stats["free_slots"] == Engine(qwen3_dir).stats["free_slots"] - engine.stats["cached_tokens"]
    engine.bad = []
    _same(engine.generate([PROMPTS[1]], SAMPLED)[0], alone[1])  # later calls work, the failed KV was not cached


class LaunchFaultEngine(Engine):
    """The built-in engine whose next launch raises once (a step that fails as a whole)."""

    fail_next = False

    def _launch(self, batch):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected launch fault")
        return super()._launch(batch)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(qwen3_dir, alone):
    engine = LaunchFaultEngine(qwen3_dir, enable_prefix_cache=True)
    done = {}
    first = engine.add_request(PROMPTS[0], GREEDY)
    done.update(engine.step())  # the first prompt's prefill
    engine.fail_next = True
    second = engine.add_request(PROMPTS[2], GREEDY)
    done.update(engine.step())  # the second prompt's prefill (prefill first): this launch raises
    while engine.has_unfinished():
        done.update(engine.step())
    _same(done[first], alone[0])  # not in the failed step: untouched
    assert done[second].finish_reason == FINISH_ABORT and done[second].output_ids == []
    assert "RuntimeError: injected launch fault" in done[second].meta[ERROR_META_KEY]
    # the failed prefill's slots are free and out of the prefix cache: a rerun computes them afresh
    assert engine.stats["free_slots"] + engine.stats["cached_tokens"] == Engine(qwen3_dir).stats["free_slots"]
    again = engine.generate(PROMPTS, [GREEDY, SAMPLED, GREEDY])
    for got, want in zip(again, alone):
        _same(got, want)
    assert again[2].meta["prefix_hit_tokens"] == 0


class StepFaultEngine(Engine):
    """The built-in engine whose scheduler breaks (an engine-level fault no request can be blamed for)."""

    def step(self):
        if self.has_unfinished() and self.scheduler.computed_tokens > 0:
            raise RuntimeError("injected engine fault")
        return super().step()


def test_generate_leaves_nothing_queued_when_it_raises(qwen3_dir):
    engine = StepFaultEngine(qwen3_dir)
    free = engine.stats["free_slots"]
    with pytest.raises(RuntimeError, match="injected engine fault"):
        engine.generate(PROMPTS, GREEDY)
    assert not engine.has_unfinished() and not engine.scheduler.has_work()
    assert engine.stats["free_slots"] == free
    assert not engine._weights._marks  # the dropped requests' weight-version bookkeeping goes with them


def test_an_aborted_request_never_scheduled_costs_no_compute(qwen3_dir):
    engine = Engine(qwen3_dir, enable_prefix_cache=False)
    keep = engine.add_request(PROMPTS[0], GREEDY)
    gone = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=50, temperature=0))
    engine.abort(gone)
    done = {}
    while engine.has_unfinished():
        done.update(engine.step())
    assert done[gone].finish_reason == FINISH_ABORT and done[gone].output_ids == []
    assert done[keep].finish_reason == FINISH_LENGTH
    # the kept prompt's prefill plus one token per decode step; not a single token of the aborted one
    assert engine.stats["computed_tokens"] == len(PROMPTS[0]) + GREEDY.max_new_tokens - 1


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=2),
                    st.lists(st.integers(-5, 600), max_size=3))
_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids")


@pytest.fixture(scope="module")
def fuzzed_engine(qwen3_dir):
    return Engine(qwen3_dir, max_context=16)


@settings(max_examples=40 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.lists(st.integers(-3, 600), max_size=6), _VALUES), min_size=1, max_size=3),
       st.lists(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=3), min_size=1, max_size=3),
       st.booleans())
def test_fuzz_the_worker_refuses_or_serves_and_stays_clean(fuzzed_engine, alone, prompts, fields, bypass):
    """Random prompts and sampling values (built or set around the checks): a ValueError or rollouts, never a mess."""
    engine = fuzzed_engine
    samplings = []
    for f in fields:
        try:
            sp = SamplingParams(max_new_tokens=2, temperature=0)
            if bypass:
                for name, value in f.items():
                    object.__setattr__(sp, name, value)
            else:
                sp = SamplingParams(**{"max_new_tokens": 2, **f})
        except ValueError:
            continue
        samplings.append(sp)
    sampling = (samplings + [GREEDY] * len(prompts))[: len(prompts)]
    try:
        out = engine.generate(prompts, sampling)
    except ValueError:
        pass
    else:
        assert len(out) == len(prompts) and all(r.finish_reason != FINISH_ABORT for r in out)
    assert not engine.has_unfinished()
    _same(engine.generate([PROMPTS[0]], GREEDY)[0], alone[0])  # still serving, and serving right
