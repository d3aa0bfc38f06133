"""The misalignment guard judges each sequence: it names a shifted or swapped one and passes correct bf16 routes."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout import RolloutWorker, SamplingParams
from rollout.moe_spec import MoESpec
from rollout.presets import init_model
from trainer_bridge import RouteMisalignmentError, RouteMisalignmentWarning, pack_batch, pad_batch, record, replay
from trainer_bridge.guard import RoutingGuard, chance_overlap, default_threshold, sequence_ids, slot_overlap


@pytest.fixture(scope="module")
def rollouts_and_model(tmp_path_factory):
    """Routes from the built-in engine in bf16 and an fp32 trainer on the same weights."""
    path = init_model("tiny-qwen3-moe", tmp_path_factory.mktemp("guard") / "model", seed=3, dtype="bfloat16")
    prompts = [list(range(10 + 7 * i, 30 + 9 * i)) for i in range(4)]
    with RolloutWorker(path, dtype="bfloat16") as worker:
        rollouts = worker.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=0))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return rollouts, model


@pytest.fixture(scope="module")
def rollout_batch(rollouts_and_model):
    rollouts, model = rollouts_and_model
    batch = pad_batch(rollouts, MoESpec.from_config(model.config))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return model, inputs, batch.routes, batch.attention_mask


def _run(model, inputs, routes, guard):
    with replay(model, routes, guard=guard) as session, torch.no_grad():
        model(**inputs)
    return session


def _shift_row(routes: torch.Tensor, mask: torch.Tensor, row: int, shift: int) -> torch.Tensor:
    """Routes of one row moved by ``shift`` tokens inside that row's real tokens (the multi-turn off-by-one)."""
    out = routes.clone()
    cols = mask[row].bool().nonzero().flatten()
    out[row, cols] = routes[row, cols].roll(shift, dims=0)
    return out


def test_correct_bf16_rollout_routes_pass(rollout_batch):
    model, inputs, routes, _ = rollout_batch
    session = _run(model, inputs, routes, guard="raise")
    assert len(session.agreement) == 4 and min(session.agreement.values()) >= 0.9, session.agreement
    seqs = session.sequence_agreement
    assert [s.row for s in seqs] == [0, 1, 2, 3] and min(s.overlap for s in seqs) >= 0.9, seqs


@pytest.mark.parametrize("shift", [1, -1])
def test_one_sequence_shifted_by_a_token_is_named(rollout_batch, shift):
    model, inputs, routes, mask = rollout_batch
    bad = _shift_row(routes, mask, row=2, shift=shift)
    with pytest.raises(RouteMisalignmentError, match=r"1 of 4 sequences: sequence 2 \(row 2, tokens \d+-\d+\)"):
        _run(model, inputs, bad, guard="raise")
    session = _run(model, inputs, bad, guard="off")
    assert session.agreement == {} and session.sequence_agreement == []  # "off" measures nothing


def test_two_swapped_sequences_are_both_named(rollout_batch):
    model, inputs, routes, mask = rollout_batch
    swapped = routes.clone()
    swapped[[0, 3]] = routes[[3, 0]]
    with pytest.warns(RouteMisalignmentWarning, match=r"2 of 4 sequences: sequence 0 \(row 0.*sequence 3 \(row 3"):
        session = _run(model, inputs, swapped, guard="warn")
    overlaps = {s.row: s.overlap for s in session.sequence_agreement}
    assert max(overlaps[0], overlaps[3]) < default_threshold(2, 8) < min(overlaps[1], overlaps[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, inputs, swapped, guard="off")


def test_segments_of_a_packed_row_are_judged_apart(rollouts_and_model):
    rollouts, model = rollouts_and_model
    packed = pack_batch(rollouts, MoESpec.from_config(model.config))
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids)
    # sdpa on CPU attends across packed segments, so the trainer's own routes stand in for the rollout's here
    with record(model) as rec, torch.no_grad():
        model(**inputs)
    routes = torch.where(packed.routes >= 0, rec.routes, -1)
    session = _run(model, inputs, routes, guard="raise")
    starts = packed.cu_seqlens.tolist()
    assert [(s.row, s.start, s.end) for s in session.sequence_agreement] == [(0, a, b) for a, b in zip(starts, starts[1:])]
    a, b = starts[1], starts[2]
    bad = routes.clone()
    bad[0, a:b] = routes[0, a:b].roll(1, dims=0)
    with pytest.raises(RouteMisalignmentError, match=rf"1 of 4 sequences: sequence 1 \(row 0, tokens {a}-{b - 1}\)"):
        _run(model, inputs, bad, guard="raise")


def test_sequence_ids_follow_rows_restarts_and_offsets():
    assert sequence_ids((2, 3), None, None, torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert sequence_ids((1, 6), pos, None, torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 2]
    cu = torch.tensor([0, 2, 6])
    assert sequence_ids((1, 6), None, cu, torch.device("cpu")).tolist() == [0, 0, 1, 1, 1, 1]


def test_guard_statistics():
    assert chance_overlap(2, 8) == 0.25 and default_threshold(2, 8) == pytest.approx(0.75)
    native = torch.tensor([[0, 1], [2, 3], [4, 5]])
    assert slot_overlap(native, torch.tensor([[1, 0], [3, 7], [6, 7]])).tolist() == [1.0, 0.5, 0.0]
    guard = RoutingGuard("raise", top_k=2, num_experts=8, layers=(3,), min_rows=2)
    guard.start((1, 3), None, None, torch.device("cpu"))
    guard.update(0, native, torch.tensor([[1, 0], [3, 7], [6, 7]]), torch.tensor([True, True, False]))
    guard.check()  # not finished: nothing judged yet (the reduction is lazy and waits for the forward's end)
    assert guard.last == {}
    guard.finish()
    guard.check()  # 0.75 over the two routed rows: not below the threshold
    assert guard.last == {3: 0.75} and [(s.overlap, s.rows) for s in guard.sequences] == [(0.75, 2)]
    guard.start((1, 3), torch.tensor([[0, 0, 1]]), None, torch.device("cpu"))  # sequences [0, 1, 1]
    guard.update(0, native, torch.tensor([[0, 1], [0, 1], [0, 1]]), torch.tensor([True, True, True]))
    guard.finish()
    with pytest.raises(RouteMisalignmentError, match=r"sequence 0 \(row 0, tokens 1-2\): 0.000"):
        guard.check()
    with pytest.raises(ValueError, match="guard must be one of"):
        RoutingGuard("loud", top_k=2, num_experts=8, layers=(0,))


def _judge_one_sequence(native: torch.Tensor, replayed: torch.Tensor) -> RoutingGuard:
    guard = RoutingGuard("raise", top_k=2, num_experts=8, layers=(0,))
    guard.start((1, len(native)), None, None, torch.device("cpu"))
    guard.update(0, native, replayed, replayed[:, 0] != -1)
    guard.finish()
    return guard


def test_a_shift_that_keeps_the_overlap_is_caught_one_token_off():
    # neighbouring tokens route alike (runs of 4): routes shifted by one keep overlap 0.89, above the threshold
    native = torch.tensor([[b % 8, (b + 1) % 8] for t in range(24) for b in [t // 4]])
    shifted = torch.cat([torch.full((1, 2), -1), native[:-1]])
    with pytest.raises(RouteMisalignmentError, match=r"sequence 0 \(row 0, tokens 0-23\): 0.891, \+0.114 one token off"):
        _judge_one_sequence(native, shifted).check()
    guard = _judge_one_sequence(native, native)  # aligned: fits its own token best
    guard.check()
    assert guard.sequences[0].overlap == 1.0 and guard.sequences[0].shift_gain < 0
    # one expert pair all along: a shift is harmless and indistinguishable, and is not flagged
    same = torch.tensor([[3, 5]] * 24)
    _judge_one_sequence(same, torch.cat([torch.full((1, 2), -1), same[:-1]])).check()
