"""Multi-turn rollouts whose routes grow turn by turn instead of being overwritten.

A continuation sends the whole conversation so far plus the new (tool / user)
tokens, with ``routed_experts_start_len`` set to where the previous routes end,
so the engine returns only the rows it has not sent before. Those rows are
appended (``RoutedExperts.concat``), keeping one sequence-aligned route object
for the whole conversation. verl's agent loop instead replaces the routes with
each turn's reply (verl issue #5825), which is only right when every reply
covers the full sequence; appending is right either way and sends far fewer bytes.

Any backend with ``generate(prompts, sampling, start_len)`` works: the SGLang
backend, ``RolloutWorker``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from rollout.routed_experts import RoutedExperts
from rollout.types import Rollout, SamplingParams

RESPONSE_MASK_KEY = "response_mask"  # meta key: 1 for sampled tokens, 0 for tokens injected between turns
TURNS_KEY = "turns"


class GenerateBackend(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, start_len: int = 0
    ) -> list[Rollout]: ...


def continuation_request(prev: Rollout, new_tokens: Sequence[int]) -> tuple[list[int], int]:
    """The next turn's prompt and the ``start_len`` that makes the engine send only new rows."""
    if prev.routed_experts is None:
        raise ValueError("the previous turn has no routes to continue from (was it generated without capture?)")
    if prev.routed_experts.end != prev.num_tokens - 1:
        raise ValueError(
            f"the previous turn's routes end at position {prev.routed_experts.end}, "
            f"but its sequence of {prev.num_tokens} tokens has routes up to {prev.num_tokens - 1}"
        )
    return prev.token_ids + [int(t) for t in new_tokens], prev.routed_experts.end


def merge_turn(prev: Rollout, new_tokens: Sequence[int], turn: Rollout) -> Rollout:
    """One ``Rollout`` for the conversation: ``prev``'s prompt, everything after it as output, routes concatenated.

    Injected tokens get logprob 0.0 and response-mask 0 (``meta["response_mask"]``),
    so a trainer can keep them out of the loss.
    """
    injected = [int(t) for t in new_tokens]
    if turn.prompt_ids != prev.token_ids + injected:
        raise ValueError("the turn's prompt is not the previous conversation followed by the new tokens")
    if turn.routed_experts is None:
        raise ValueError("the continuation came back without routes")
    prev_mask = prev.meta.get(RESPONSE_MASK_KEY, [1] * len(prev.output_ids))
    return Rollout(
        prompt_ids=list(prev.prompt_ids),
        output_ids=list(prev.output_ids) + injected + list(turn.output_ids),
        output_logprobs=list(prev.output_logprobs) + [0.0] * len(injected) + list(turn.output_logprobs),
        finish_reason=turn.finish_reason,
        routed_experts=RoutedExperts.concat([prev.routed_experts, turn.routed_experts]),
        meta={
            RESPONSE_MASK_KEY: list(prev_mask) + [0] * len(injected) + [1] * len(turn.output_ids),
            TURNS_KEY: int(prev.meta.get(TURNS_KEY, 1)) + 1,
        },
    )


def continue_rollout(
    prev: Rollout, new_tokens: Sequence[int], sampling: SamplingParams, backend: GenerateBackend
) -> Rollout:
    """Run the next turn of a conversation and return the whole conversation so far."""
    prompt, start = continuation_request(prev, new_tokens)
    (turn,) = backend.generate([prompt], sampling, start_len=start)
    return merge_turn(prev, new_tokens, turn)
