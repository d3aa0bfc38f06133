"""Multi-turn routes append turn by turn; checked on real SGLang replies (cases 0, 8, 9 of the fixture)."""

from __future__ import annotations

import json

import pytest

from rollout.moe_spec import MoESpec
from rollout.sglang.multiturn import RESPONSE_MASK_KEY, TURNS_KEY, continuation_request, merge_turn
from rollout.sglang.protocol import decode_reply
from rollout.types import Rollout


@pytest.fixture(scope="module")
def turns(sglang_fixture):
    recorded = json.loads((sglang_fixture / "replies.json").read_text())
    spec = MoESpec.from_config(recorded["config"])

    def decode(i):
        req = recorded["cases"][i]["request"]
        return decode_reply(
            recorded["cases"][i]["reply"], req["input_ids"], spec, start_len=req.get("routed_experts_start_len", 0)
        )

    return decode(0), decode(8), decode(9), recorded["cases"][9]["request"]


def test_real_sglang_continuation_concatenates_to_the_single_shot_routes(turns):
    first, single_shot, tail, tail_request = turns
    new_tokens = single_shot.prompt_ids[first.num_tokens :]
    prompt, start = continuation_request(first, new_tokens)
    # The request SGLang was really sent for the continuation is exactly what we would send.
    assert prompt == tail_request["input_ids"] and start == tail_request["routed_experts_start_len"]
    merged = merge_turn(first, new_tokens, tail)
    assert merged.routed_experts == single_shot.routed_experts
    assert merged.token_ids == single_shot.token_ids
    assert merged.meta[RESPONSE_MASK_KEY] == [1] * 16 + [0] * 3 + [1] * 8
    assert merged.meta[TURNS_KEY] == 2
    assert merged.output_logprobs[16:19] == [0.0] * 3


def test_a_turn_that_does_not_continue_is_refused(turns):
    first, _, tail, _ = turns
    with pytest.raises(ValueError, match="not the previous conversation"):
        merge_turn(first, [1, 2], tail)
    no_routes = Rollout(first.prompt_ids, first.output_ids, first.output_logprobs, first.finish_reason, None)
    with pytest.raises(ValueError, match="no routes"):
        continuation_request(no_routes, [1])
    short = Rollout(
        first.prompt_ids, first.output_ids, first.output_logprobs, first.finish_reason,
        first.routed_experts.slice(0, 10),
    )
    with pytest.raises(ValueError, match="routes end at position 10"):
        continuation_request(short, [1])

