"""Real routes captured by SGLang 0.5.17 on a tiny Qwen3-MoE, replayed on the same checkpoint in transformers."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from replay_helpers import ExpertInputs
from rollout.moe_spec import MoESpec
from rollout.routed_experts import RoutedExperts
from rollout.types import FINISH_LENGTH, Rollout
from trainer_bridge import metrics, pad_batch, record, replay


def _rollouts(fixture, spec: MoESpec) -> list[Rollout]:
    cases = json.loads((fixture / "replies.json").read_text())["cases"]
    rollouts = []
    for case in cases:
        request, reply = case["request"], case["reply"]
        if "routed_experts" not in reply["meta_info"]:
            continue
        prompt, output = request["input_ids"], reply["output_ids"]
        start = request.get("routed_experts_start_len") or 0
        routes = RoutedExperts.from_sglang(
            reply["meta_info"]["routed_experts"],
            num_experts=spec.num_experts,
            num_hidden_layers=spec.num_hidden_layers,
            top_k=spec.top_k,
            moe_layers=spec.moe_layers,
            start=start,
            num_tokens=len(prompt) + len(output) - 1 - start,
        )
        logprobs = [lp for lp, _, _ in reply["meta_info"]["output_token_logprobs"]]
        rollouts.append(Rollout(prompt, output, logprobs, FINISH_LENGTH, routes))
    return rollouts


def test_sglang_routes_replay_on_every_row_while_native_routing_differs_slightly(sglang_fixture):
    model = AutoModelForCausalLM.from_pretrained(sglang_fixture, dtype=torch.float32).eval()
    spec = MoESpec.from_config(model.config)
    rollouts = _rollouts(sglang_fixture, spec)
    assert len(rollouts) == 10
    batch = pad_batch(rollouts, spec)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    routed = batch.routes[..., 0] >= 0  # [B, S, L]
    assert int(routed.sum()) == sum(r.routed_experts.num_tokens for r in rollouts) * len(spec.moe_layers)

    with record(model) as native, torch.no_grad():
        model(**inputs)
    agreement = metrics.routing_agreement(native.routes, batch.routes)
    overall = float((native.routes.sort(-1).values == batch.routes.sort(-1).values).all(-1)[routed].double().mean())
    # fixture README: 99.06% in fp32 on the same weights; numerics flip a few near-ties
    assert 0.97 <= overall < 0.9995, overall
    assert all(0.95 <= float(a) <= 1.0 for a in agreement)

    seen = ExpertInputs(model)
    with replay(model, batch.routes, guard="raise"), torch.no_grad():
        model(**inputs)
    seen.remove()
    reached = seen.stacked().reshape(batch.routes.shape)
    assert torch.equal(reached[routed], batch.routes[routed])  # 100% of the SGLang rows
