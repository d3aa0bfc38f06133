"""Replay on every supported family: selection, gate weights against a hand-written reference, gradients, identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollout.moe_spec import MoESpec
from replay_helpers import FAMILY_PRESETS, ExpertInputs, random_routes
from trainer_bridge import record, replay
from trainer_bridge.routers import moe_blocks_of

BATCH, SEQ = 2, 12


def _tokens(seed: int = 0, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def _bias_the_selection(model: torch.nn.Module) -> None:
    """Give DeepSeek-style routers a non-zero selection-only bias, so using it for the weights would show."""
    g = torch.Generator().manual_seed(1)
    for block in moe_blocks_of(model)[1]:
        bias = getattr(block.router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.rand(bias.shape, generator=g) * 0.5)


def _reference_gate_weights(model_type: str, config, block, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each family's gate weights, computed from scratch for forced ids."""
    if model_type in ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral"):
        logits = F.linear(h, block.router.weight)
        w = torch.softmax(logits.float(), dim=-1).gather(-1, ids)
        if model_type == "mixtral" or config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w.to(logits.dtype)
    if model_type == "gpt_oss":  # top-k then softmax over the selected logits
        logits = F.linear(h, block.router.weight, block.router.bias)
        return torch.softmax(logits.gather(-1, ids), dim=-1)
    if model_type in ("deepseek_v3", "glm4_moe"):  # un-biased sigmoid scores, renormalised, scaled
        w = torch.sigmoid(F.linear(h.float(), block.router.weight.float())).gather(-1, ids)
        if config.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * config.routed_scaling_factor
    raise AssertionError(model_type)


def _forced_reference(model: torch.nn.Module, routes: torch.Tensor):
    """Replace each MoE block's forward by a hand-written one that uses ``routes``; returns the undo handles."""
    spec = MoESpec.from_config(model.config)
    flat = routes.reshape(-1, *routes.shape[-2:])
    blocks = moe_blocks_of(model)[1]
    for block in blocks:

        def forward(hidden_states, block=block):
            b, s, d = hidden_states.shape
            h = hidden_states.reshape(-1, d)
            ids = flat[:, block.row]
            w = _reference_gate_weights(spec.model_type, model.config, block, h, ids)
            m = block.module
            out = m.experts(h, ids, w)
            if spec.model_type == "qwen2_moe":
                out = out + torch.sigmoid(m.shared_expert_gate(h)) * m.shared_expert(h)
            if spec.model_type in ("deepseek_v3", "glm4_moe"):
                out = out + m.shared_experts(hidden_states).reshape(-1, d)
            out = out.reshape(b, s, d)
            return (out, w) if spec.model_type == "gpt_oss" else out

        block.module.forward = forward
    return blocks


def _router_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.router.weight.grad.clone() for b in moe_blocks_of(model)[1]]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_selection_reaches_experts_and_native_rows_stay_native(load_tiny, preset):
    model = load_tiny(preset)
    _bias_the_selection(model)
    spec = MoESpec.from_config(model.config)
    ids = _tokens()
    with record(model) as rec, torch.no_grad():
        model(input_ids=ids)
    native = rec.routes
    routes = random_routes((BATCH, SEQ), len(spec.moe_layers), spec.top_k, spec.num_experts)
    unrouted = torch.rand(BATCH, SEQ, len(spec.moe_layers), generator=torch.Generator().manual_seed(2)) < 0.25
    routes[unrouted] = -1
    seen = ExpertInputs(model)
    with replay(model, routes, guard="off"), torch.no_grad():
        model(input_ids=ids)
    seen.remove()
    reached = seen.stacked().reshape(routes.shape)
    assert torch.equal(reached[~unrouted], routes[~unrouted])  # 100% of routed rows
    # -1 rows route natively; only the first MoE layer's inputs do not depend on the replayed rows
    first = unrouted[:, :, 0]
    assert bool(first.any()) and torch.equal(reached[:, :, 0][first], native[:, :, 0][first])

    seen = ExpertInputs(model)
    with replay(model, torch.full_like(routes, -1), guard="raise"), torch.no_grad():
        model(input_ids=ids)
    seen.remove()
    assert torch.equal(seen.stacked().reshape(routes.shape), native)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_output_and_router_gradient_match_forced_reference(load_tiny, preset):
    model = load_tiny(preset)
    _bias_the_selection(model)
    spec = MoESpec.from_config(model.config)
    ids = _tokens()
    routes = random_routes((BATCH, SEQ), len(spec.moe_layers), spec.top_k, spec.num_experts, seed=3)

    with replay(model, routes, guard="off"):
        logits = model(input_ids=ids).logits
        _loss(model, ids).backward()
    replay_grads = _router_grads(model)
    model.zero_grad()

    blocks = _forced_reference(model, routes)
    ref_logits = model(input_ids=ids).logits
    _loss(model, ids).backward()
    ref_grads = _router_grads(model)
    for block in blocks:
        del block.module.forward

    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(replay_grads, ref_grads):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_replaying_native_routes_is_exactly_native(load_tiny, preset):
    model = load_tiny(preset)
    _bias_the_selection(model)
    ids = _tokens(seed=5, seq=20)  # 40 rows per layer: enough for the guard to judge (MIN_GUARD_ROWS)
    with record(model) as rec, torch.no_grad():
        native = model(input_ids=ids).logits
    with replay(model, rec.routes, guard="raise") as session, torch.no_grad():
        replayed = model(input_ids=ids).logits
    assert torch.equal(native, replayed)
    assert "forward" not in vars(moe_blocks_of(model)[1][0].module)  # unpatched
    assert list(session.agreement.values()) == [1.0] * len(session.spec.moe_layers)
