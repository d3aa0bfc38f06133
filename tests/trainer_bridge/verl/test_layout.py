"""verl's ``routed_experts`` layout: reading it (padded and remove-padding forms) and producing it from Rollouts."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from rollout.moe_spec import MoESpec
from rollout.presets import PRESETS, make_config
from rollout.routed_experts import RoutedExperts
from rollout.types import FINISH_LENGTH, Rollout
from trainer_bridge.verl import check_verl_routes, rollouts_to_verl_fields, routes_from_nested, routes_from_padded
from trainer_bridge.verl.layout import packed_model_routes, padded_model_routes


@pytest.fixture
def qwen3() -> MoESpec:
    return MoESpec.from_config(make_config("tiny-qwen3-moe"))


@pytest.fixture
def qwen2() -> MoESpec:
    """Dense layer 0: verl keeps it as zeros, the replay tensor drops it."""
    return MoESpec.from_config(make_config("tiny-qwen2-moe"))


@pytest.fixture
def top1() -> MoESpec:
    """top_k = 1: an all-zero row is a real route through expert 0, so only structure can say "no route"."""
    return MoESpec.from_config(dict(PRESETS["tiny-qwen3-moe"], num_experts_per_tok=1))


def rollout(spec: MoESpec, prompt: list[int], output: list[int], seed: int) -> Rollout:
    n = len(prompt) + len(output)
    g = np.random.default_rng(seed)
    ids = np.stack([g.permutation(spec.num_experts)[: spec.top_k] for _ in range((n - 1) * len(spec.moe_layers))])
    routes = RoutedExperts(ids.reshape(n - 1, len(spec.moe_layers), spec.top_k), spec.num_experts, spec.moe_layers)
    return Rollout(prompt, output, [-0.5] * len(output), FINISH_LENGTH, routes)


def test_fields_follow_verls_agent_loop_layout(qwen2):
    rollouts = [rollout(qwen2, [5, 6, 7], [8, 9], 0), rollout(qwen2, [1], [2, 3, 4], 1)]
    f = rollouts_to_verl_fields(rollouts, qwen2, prompt_length=4, response_length=3, pad_token_id=0)
    assert f["input_ids"].tolist() == [[0, 5, 6, 7, 8, 9, 0], [0, 0, 0, 1, 2, 3, 4]]
    assert f["prompts"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 1]]
    assert f["responses"].tolist() == [[8, 9, 0], [2, 3, 4]]
    assert f["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert f["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert f["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 1, 2, 3]]
    assert f["rollout_log_probs"].tolist() == [[-0.5, -0.5, 0.0], [-0.5, -0.5, -0.5]]
    routes = f["routed_experts"]
    assert routes.dtype == torch.int16 and routes.shape == (2, 7, qwen2.num_hidden_layers, qwen2.top_k)
    # verl's agent loop: the engine's rows [0, n-1) start at the first prompt column; dense layer, padding
    # and the final token are zeros.
    for i, (r, start) in enumerate(zip(rollouts, (1, 3))):
        n = r.num_tokens
        assert torch.equal(routes[i, start : start + n - 1][:, 1:].long(), torch.from_numpy(r.routed_experts.ids.astype(np.int64)))
        assert not routes[i, :, 0].any()
        assert not routes[i, :start].any() and not routes[i, start + n - 1 :].any()


def test_padded_form_reads_zero_rows_as_no_route_but_keeps_expert_zero(qwen2):
    rollouts = [rollout(qwen2, [5, 6, 7], [8, 9], 0), rollout(qwen2, [1], [2, 3, 4], 1)]
    rollouts[0].routed_experts.ids[1, 0] = [0, 3]  # a real route through expert 0
    f = rollouts_to_verl_fields(rollouts, qwen2, prompt_length=4, response_length=3)
    routes = routes_from_padded(f["routed_experts"], f["attention_mask"], qwen2)
    assert routes.shape == (2, 7, len(qwen2.moe_layers), qwen2.top_k)
    for i, (r, start) in enumerate(zip(rollouts, (1, 3))):
        n = r.num_tokens
        assert torch.equal(routes[i, start : start + n - 1], r.routed_experts.to_torch())
        assert (routes[i, :start] == -1).all(), "left padding must route natively"
        assert (routes[i, start + n - 1] == -1).all(), "the final token must route natively"
        assert (routes[i, start + n :] == -1).all(), "right padding must route natively"
    assert routes[0, 2, 0].tolist() == [0, 3]


def test_top1_final_token_routes_natively_while_expert_zero_rows_replay(top1):
    """With top_k = 1 the all-zero filler rule cannot apply: the final-token mask alone keeps it from replaying expert 0."""
    rollouts = [rollout(top1, [5, 6, 7], [8, 9], 0), rollout(top1, [1], [2, 3, 4], 1)]
    rollouts[0].routed_experts.ids[:2] = 0  # real routes through expert 0 on every layer
    f = rollouts_to_verl_fields(rollouts, top1, prompt_length=4, response_length=3)
    routes = routes_from_padded(f["routed_experts"], f["attention_mask"], top1)
    for i, (r, start) in enumerate(zip(rollouts, (1, 3))):
        n = r.num_tokens
        assert torch.equal(routes[i, start : start + n - 1], r.routed_experts.to_torch()), f"sequence {i}"
        assert (routes[i, start + n - 1] == -1).all(), f"sequence {i}: the final token must route natively"
        assert (routes[i, :start] == -1).all() and (routes[i, start + n :] == -1).all()
    assert (routes[0, 1:3] == 0).all()  # expert 0 is replayed where the rollout chose it


def test_top1_nested_form_masks_each_final_token(top1):
    values = torch.zeros(7, top1.num_hidden_layers, 1, dtype=torch.int16)  # every row expert 0
    routes = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 7]))
    tokens = torch.nested.nested_tensor_from_jagged(torch.arange(7), offsets=torch.tensor([0, 3, 7]))
    out = routes_from_nested(routes, tokens, top1)
    assert out[:, 0, 0].tolist() == [0, 0, -1, 0, 0, 0, -1]


def test_trailing_zero_rows_inside_the_mask_route_natively(qwen3):
    """Multi-turn loops stop capturing at the last generation: verl leaves those attended rows zero."""
    routes = torch.zeros(1, 6, qwen3.num_hidden_layers, qwen3.top_k, dtype=torch.int16)
    routes[0, :3] = torch.tensor([1, 2], dtype=torch.int16)
    mask = torch.ones(1, 6, dtype=torch.long)
    out = routes_from_padded(routes, mask, qwen3)
    assert (out[0, :3] == torch.tensor([1, 2])).all()
    assert (out[0, 3:] == -1).all()


def test_nested_form_matches_verls_remove_padding(qwen2):
    padding = pytest.importorskip("verl.workers.utils.padding", reason="verl 0.9.x is not installed")
    from tensordict import TensorDict

    rollouts = [rollout(qwen2, [5, 6, 7], [8, 9], 0), rollout(qwen2, [1], [2, 3, 4], 1), rollout(qwen2, [4, 4], [1], 2)]
    f = rollouts_to_verl_fields(rollouts, qwen2, prompt_length=4, response_length=3)
    td = padding.left_right_2_no_padding(TensorDict(dict(f), batch_size=[3]))
    nested = routes_from_nested(td["routed_experts"], td["input_ids"], qwen2)
    padded = routes_from_padded(f["routed_experts"], f["attention_mask"], qwen2)
    assert torch.equal(nested, padded[f["attention_mask"].bool()])


def test_model_routes_follow_verls_packed_and_padded_inputs():
    """verl appends its packing pad (pad_to_length, Ulysses alignment) after the tokens; padded inputs are right-padded."""
    flat = torch.arange(5 * 4 * 2).reshape(5, 4, 2)
    packed = packed_model_routes(flat, 8)
    assert packed.shape == (1, 8, 4, 2)
    assert torch.equal(packed[0, :5], flat) and (packed[0, 5:] == -1).all()
    with pytest.raises(ValueError, match="the packed input has 4 tokens but the routes cover 5"):
        packed_model_routes(flat, 4)
    tokens = torch.nested.nested_tensor_from_jagged(torch.arange(5), offsets=torch.tensor([0, 2, 5]))
    padded = padded_model_routes(flat, tokens, 4)
    assert padded.shape == (2, 4, 4, 2)
    assert torch.equal(padded[0, :2], flat[:2]) and (padded[0, 2:] == -1).all()
    assert torch.equal(padded[1, :3], flat[2:]) and (padded[1, 3:] == -1).all()


def test_nested_form_refuses_routes_packed_unlike_the_tokens(qwen3):
    values = torch.ones(5, qwen3.num_hidden_layers, qwen3.top_k, dtype=torch.int16)
    routes = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 2, 5]))
    tokens = torch.nested.nested_tensor_from_jagged(torch.arange(5), offsets=torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match=r"sequence lengths \[2, 3\] but input_ids has \[3, 2\]"):
        routes_from_nested(routes, tokens, qwen3)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 5, 6, 2), r"has 6 layers but the model at actor_rollout_ref.model.path has num_hidden_layers=4"),
        ((2, 5, 4, 3), r"has top_k=3 .*\(actor_rollout_ref.rollout.enable_rollout_routing_replay\)"),
        ((2, 5, 4), r"must be \[batch, seq, num_hidden_layers, top_k\]"),
    ],
)
def test_routes_of_another_shape_are_refused(qwen3, shape, message):
    with pytest.raises(ValueError, match=message):
        check_verl_routes(torch.zeros(shape, dtype=torch.int16), qwen3)


def test_mixed_rollouts_with_and_without_routes_are_refused(qwen3):
    with_routes = rollout(qwen3, [1, 2], [3], 0)
    without = Rollout([1, 2], [3], [-1.0], FINISH_LENGTH)
    with pytest.raises(ValueError, match=r"rollouts \[1\] have no routed_experts"):
        rollouts_to_verl_fields([with_routes, without], qwen3)
    assert "routed_experts" not in rollouts_to_verl_fields([without], qwen3)


def test_real_sglang_routes_land_where_verls_agent_loop_puts_them(sglang_fixture):
    """The SGLang 0.5.17 replies, through this project's decoder and the helper, equal verl's placement of the raw array."""
    from rollout.sglang.protocol import decode_reply

    spec = MoESpec.from_pretrained(sglang_fixture)
    cases = json.loads((sglang_fixture / "replies.json").read_text())["cases"][:8]
    rollouts = [decode_reply(c["reply"], c["request"]["input_ids"], spec) for c in cases]
    prompt_width = max(len(r.prompt_ids) for r in rollouts)
    response_width = max(len(r.output_ids) for r in rollouts)
    f = rollouts_to_verl_fields(rollouts, spec, prompt_length=prompt_width, response_length=response_width)
    for i, case in enumerate(cases):
        # verl.experimental.agent_loop: routed_experts[:, start_pos:end_pos] = int16 array, start_pos = P - len(prompt)
        raw = np.frombuffer(base64.b64decode(case["reply"]["meta_info"]["routed_experts"]), dtype="<i4")
        raw = torch.from_numpy(raw.reshape(-1, spec.num_hidden_layers, spec.top_k).astype(np.int16))
        expected = torch.zeros(prompt_width + response_width, spec.num_hidden_layers, spec.top_k, dtype=torch.int16)
        start = prompt_width - len(case["request"]["input_ids"])
        expected[start : start + raw.shape[0]] = raw
        assert torch.equal(f["routed_experts"][i], expected), f"case {i}"
