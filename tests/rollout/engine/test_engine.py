"""Scheduling, overlap, prefix reuse, preemption and bad input on the real engine (tiny Qwen3-MoE, fp32)."""

import numpy as np
import pytest

from rollout.engine.engine import ROUTE_COPY_ROWS, Engine
from rollout.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, SamplingParams

STOPS = (7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def _workload(n=8, seed=0):
    """Mixed lengths and sampling settings; frequent stop tokens exercise finish-one-step-late."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 512, size=int(k)).tolist() for k in rng.integers(3, 20, size=n)]
    temps = [0.0, 1.0, 0.7, 1.3]
    sampling = [
        SamplingParams(
            max_new_tokens=int(rng.integers(4, 24)), temperature=temps[i % 4], top_p=[1.0, 0.9][i % 2],
            top_k=[-1, -1, 5, 20][i % 4], seed=i, stop_token_ids=STOPS,
        )
        for i in range(n)
    ]
    return prompts, sampling


def _assert_same(a, b, what):
    """Identical tokens, routes and finish reasons; logprobs equal to float noise (batch shapes differ)."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.output_ids == y.output_ids, f"{what}: request {i} tokens differ"
        assert x.finish_reason == y.finish_reason, f"{what}: request {i} finish differs"
        assert x.routed_experts == y.routed_experts, f"{what}: request {i} routes differ"
        y.routed_experts.validate()  # built unvalidated on the engine's hot path: must hold anyway
        np.testing.assert_allclose(x.output_logprobs, y.output_logprobs, atol=1e-5, err_msg=what)


@pytest.fixture(scope="module")
def reference(qwen3_dir):
    """The plain loop (overlap off, no prefix cache, big pool) is the reference for everything else."""
    prompts, sampling = _workload()
    out = Engine(qwen3_dir, overlap=False, enable_prefix_cache=False).generate(prompts, sampling)
    reasons = {r.finish_reason for r in out}
    assert reasons == {FINISH_LENGTH, FINISH_STOP}, "the workload must exercise both finish reasons"
    return prompts, sampling, out


def test_routes_cover_prompt_plus_output_minus_one(reference):
    prompts, _, out = reference
    for p, r in zip(prompts, out):
        assert r.routed_experts.ids.shape == (len(p) + len(r.output_ids) - 1, 4, 2)
        assert r.routed_experts.start == 0 and r.routed_experts.row_mask().all()
        assert len(r.output_logprobs) == len(r.output_ids)


def test_overlap_on_equals_overlap_off(qwen3_dir, reference):
    prompts, sampling, ref = reference
    engine = Engine(qwen3_dir, overlap=True, enable_prefix_cache=False)
    _assert_same(ref, engine.generate(prompts, sampling), "overlap")
    # the host ran ahead: a stop token was learned one step late, and that step was discarded (nothing else extra)
    stops = sum(r.finish_reason == FINISH_STOP for r in ref)
    plain = sum(len(p) + len(r.output_ids) - 1 for p, r in zip(prompts, ref))
    assert 0 < engine.stats["computed_tokens"] - plain <= stops


def test_staggered_arrival_equals_one_at_a_time(qwen3_dir, reference):
    prompts, sampling, ref = reference
    engine = Engine(qwen3_dir)
    one_by_one = [engine.generate([p], s)[0] for p, s in zip(prompts, sampling)]
    _assert_same(ref, one_by_one, "one at a time")

    engine, rids, done = Engine(qwen3_dir), [], {}
    for i, (p, s) in enumerate(zip(prompts, sampling)):
        rids.append(engine.add_request(p, s))
        for _ in range(i % 3):  # let the running ones advance before the next arrives
            done.update(engine.step())
    while engine.has_unfinished():
        done.update(engine.step())
    _assert_same(ref, [done[r] for r in rids], "staggered")


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_with_a_tiny_pool_matches_a_large_pool(qwen3_dir, reference, prefix_cache):
    prompts, sampling, ref = reference
    engine = Engine(qwen3_dir, kv_slots=48, max_batch_tokens=16, enable_prefix_cache=prefix_cache)
    out = engine.generate(prompts, sampling)
    assert engine.stats["preemptions"] > 0, "the pool was meant to be too small"
    assert any(r.meta["preemptions"] for r in out)
    _assert_same(ref, out, "preemption")


def test_routes_are_copied_out_while_the_batch_runs_and_equal_the_host_cache(qwen3_dir):
    """Equal-length requests all finish in one step; entering it, their routes are already copied into
    them but for the last few rows (``Engine._copy_routes_while_running``), and what comes back is
    exactly what the slot-keyed host cache holds for their tokens."""
    prompt_len, new_tokens = 20, 40
    engine = Engine(qwen3_dir)
    prompts = np.random.default_rng(3).integers(0, 512, size=(3, prompt_len)).tolist()
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, temperature=0)) for p in prompts]
    finished, copied_entering_last_step = {}, []
    while len(finished) < len(rids):
        copied = [engine._requests[rid].routes_copied for rid in rids if rid in engine._requests]
        out = engine.step()
        if out:
            copied_entering_last_step = copied
        finished.update(out)
    rows = prompt_len + new_tokens - 1  # the last sampled token never went through the model
    assert len(copied_entering_last_step) == len(rids)
    assert all(rows - 2 * ROUTE_COPY_ROWS <= c < rows for c in copied_entering_last_step), copied_entering_last_step
    for rid in rids:
        rollout = finished[rid]
        slots = engine.scheduler.prefix_cache.match(rollout.token_ids[:rows]).slots  # the finished KV went there
        assert len(slots) == rows
        np.testing.assert_array_equal(rollout.routed_experts.ids, engine.capture.host_cache[list(slots)])


def test_prefix_reuse_returns_the_same_routes_without_recomputing(qwen3_dir):
    engine = Engine(qwen3_dir)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    first = engine.generate([[3, 1, 4, 1, 5, 9, 2, 6]], greedy)[0]
    follow_up = first.token_ids + [53, 58, 97]  # multi-turn: previous turn + new user tokens
    before = dict(engine.stats)
    second = engine.generate([follow_up], greedy)[0]
    reused = len(first.token_ids) - 1  # the last sampled token of turn one never went through the model
    assert second.meta["prefix_hit_tokens"] == reused
    assert engine.stats["prefix_hit_tokens"] - before["prefix_hit_tokens"] == reused
    assert engine.stats["computed_tokens"] - before["computed_tokens"] == len(follow_up) - reused + 6 - 1
    assert second.routed_experts.slice(0, reused) == first.routed_experts.slice(0, reused)
    # and the cached answer equals a cold computation of the same request
    cold = Engine(qwen3_dir, enable_prefix_cache=False).generate([follow_up], greedy)[0]
    assert cold.output_ids == second.output_ids and cold.routed_experts == second.routed_experts


def test_start_len_returns_only_the_new_turn(qwen3_dir):
    engine = Engine(qwen3_dir)
    prompt = [9, 8, 7, 6, 5, 4]
    full = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0))[0]
    part = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0), start_len=4)[0]
    assert part.routed_experts.start == 4
    assert part.routed_experts == full.routed_experts.slice(4)


def test_context_limit_finishes_with_length(qwen3_dir):
    engine = Engine(qwen3_dir, max_context=12)
    r = engine.generate([[1] * 10], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(r.output_ids) == 2 and r.finish_reason == FINISH_LENGTH


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "non-empty list of token ids"),
        ([1, 512], r"token id 512 is outside the vocabulary \[0, 512\)"),
        ([1, -3], "token id -3 is outside the vocabulary"),
        ([1] * 64, "prompt of 64 tokens does not fit the context of 64 tokens"),
    ],
)
def test_bad_request_is_refused_and_the_others_are_unaffected(qwen3_dir, prompt, message):
    engine = Engine(qwen3_dir, max_context=64)
    good = SamplingParams(max_new_tokens=5, temperature=0)
    alone = Engine(qwen3_dir, max_context=64).generate([[2, 3, 4]], good)[0]
    rid = engine.add_request([2, 3, 4], good)
    engine.step()  # the good request is mid-flight when the bad one arrives
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, good)
    with pytest.raises(ValueError, match="prompt 1: .*" + message):
        engine.generate([[5, 6], prompt], good)
    done = {}
    while engine.has_unfinished():
        done.update(engine.step())
    assert done[rid].output_ids == alone.output_ids and done[rid].routed_experts == alone.routed_experts


def test_bad_sampling_and_start_len(qwen3_dir):
    engine = Engine(qwen3_dir)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer in \\[1, "):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="start_len must be an integer in"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=1), start_len=3)


def test_abort_returns_what_was_generated(qwen3_dir):
    engine = Engine(qwen3_dir)
    keep = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0))
    gone = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=100, temperature=0))
    done = {}
    for _ in range(3):
        done.update(engine.step())
    engine.abort(gone)
    while engine.has_unfinished():
        done.update(engine.step())
    aborted = done[gone]
    assert aborted.finish_reason == FINISH_ABORT and 0 < len(aborted.output_ids) < 100
    assert aborted.routed_experts.ids.shape[0] == 3 + len(aborted.output_ids) - 1
    assert done[keep].finish_reason == FINISH_LENGTH and len(done[keep].output_ids) == 8
    with pytest.raises(ValueError, match="no unfinished request"):
        engine.abort(gone)


def test_routes_off_returns_none(qwen3_dir):
    r = Engine(qwen3_dir, return_routed_experts=False).generate([[1, 2]], SamplingParams(max_new_tokens=2))[0]
    assert r.routed_experts is None and len(r.output_ids) == 2


def test_chunked_prefill_equals_one_chunk(qwen3_dir):
    prompt = list(range(100, 140))
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    whole = Engine(qwen3_dir).generate([prompt], greedy)[0]
    chunked = Engine(qwen3_dir, max_batch_tokens=7).generate([prompt], greedy)[0]
    assert chunked.output_ids == whole.output_ids and chunked.routed_experts == whole.routed_experts


def test_generate_keeps_results_of_requests_added_elsewhere(qwen3_dir):
    engine = Engine(qwen3_dir)
    other = engine.add_request([1, 2], SamplingParams(max_new_tokens=1, temperature=0))
    mine = engine.generate([[3, 4]], SamplingParams(max_new_tokens=3, temperature=0))
    assert len(mine[0].output_ids) == 3
    later = dict(engine.step())
    assert later[other].output_ids and not engine.has_unfinished()


def test_progress_streams_the_tokens_of_a_running_request(qwen3_dir):
    engine = Engine(qwen3_dir)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0))
    seen, done = [], {}
    while engine.has_unfinished():
        done.update(engine.step())
        so_far = engine.progress(rid)
        if so_far is not None:
            seen.append(len(so_far[0]))
    assert seen == sorted(seen) and 0 < seen[-1] < 5  # grew step by step before the finish
    assert engine.progress(rid) is None and len(done[rid].output_ids) == 5


def test_generate_validates_every_request_before_queueing_any(qwen3_dir):
    engine = Engine(qwen3_dir)
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="prompt 1: start_len"):
        engine.generate([[1, 2, 3], [4, 5]], greedy, start_len=[0, 9])
    assert not engine.has_unfinished()  # prompt 0 was not left queued
