"""The misalignment guard flags shifted and wrong-sequence routes and passes correct ones from a bf16 rollout."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout import RolloutWorker, SamplingParams
from rollout.moe_spec import MoESpec
from rollout.presets import init_model
from trainer_bridge import RouteMisalignmentError, RouteMisalignmentWarning, pad_batch, replay
from trainer_bridge.guard import RoutingGuard, chance_overlap, default_threshold, slot_overlap


@pytest.fixture(scope="module")
def rollout_batch(tmp_path_factory):
    """Routes from the built-in engine in bf16 and an fp32 trainer on the same weights."""
    path = init_model("tiny-qwen3-moe", tmp_path_factory.mktemp("guard") / "model", seed=3, dtype="bfloat16")
    prompts = [list(range(10 + 7 * i, 30 + 9 * i)) for i in range(4)]
    with RolloutWorker(path, dtype="bfloat16") as worker:
        rollouts = worker.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=0))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = pad_batch(rollouts, MoESpec.from_config(model.config))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return model, inputs, batch.routes


def _run(model, inputs, routes, guard):
    with replay(model, routes, guard=guard) as session, torch.no_grad():
        model(**inputs)
    return session.agreement


def test_correct_bf16_rollout_routes_pass(rollout_batch):
    model, inputs, routes = rollout_batch
    agreement = _run(model, inputs, routes, guard="raise")
    assert len(agreement) == 4 and min(agreement.values()) >= 0.9, agreement


def test_routes_shifted_by_one_token_are_flagged(rollout_batch):
    model, inputs, routes = rollout_batch
    for shift in (1, -1):
        with pytest.raises(RouteMisalignmentError, match="shifted by a token"):
            _run(model, inputs, routes.roll(shift, dims=1), guard="raise")


def test_routes_from_another_sequence_warn(rollout_batch):
    model, inputs, routes = rollout_batch
    with pytest.warns(RouteMisalignmentWarning, match="overlap per layer"):
        agreement = _run(model, inputs, routes.roll(1, dims=0), guard="warn")
    assert max(agreement.values()) < default_threshold(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, inputs, routes.roll(1, dims=0), guard="off")


def test_guard_statistics():
    assert chance_overlap(2, 8) == 0.25 and default_threshold(2, 8) == pytest.approx(0.75)
    native = torch.tensor([[0, 1], [2, 3], [4, 5]])
    assert slot_overlap(native, torch.tensor([[1, 0], [3, 7], [6, 7]])).tolist() == [1.0, 0.5, 0.0]
    guard = RoutingGuard("raise", top_k=2, num_experts=8, layers=(3,), min_rows=2)
    guard.update(0, native, torch.tensor([[1, 0], [3, 7], [6, 7]]), torch.tensor([True, True, False]))
    guard.check()  # 0.75 over the two routed rows: not below the threshold
    assert guard.last == {3: 0.75}
    guard.update(0, native, torch.tensor([[6, 7], [0, 1], [0, 1]]), torch.tensor([True, True, True]))
    with pytest.raises(RouteMisalignmentError):
        guard.check()
    with pytest.raises(ValueError, match="guard must be one of"):
        RoutingGuard("loud", top_k=2, num_experts=8, layers=(0,))
