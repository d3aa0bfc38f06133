"""Turn this project's ``Rollout`` objects into the batch fields verl's agent loop produces.

The token layout is trainer_bridge's :func:`~trainer_bridge.layouts.pad_batch`
(verl's: left-padded prompt, right-padded response); only the route encoding
differs: verl keeps every decoder layer (dense ones as zeros) and writes
"no route" as zero rows, in int16, exactly as
``verl.experimental.agent_loop`` fills ``routed_experts`` from SGLang or vLLM.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rollout.moe_spec import MoESpec
from rollout.types import Rollout
from trainer_bridge.layouts import pad_batch
from trainer_bridge.verl.layout import ROUTES_FIELD, to_verl_layers


def rollouts_to_verl_fields(
    rollouts: Sequence[Rollout],
    spec: MoESpec,
    *,
    prompt_length: int | None = None,
    response_length: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """verl's fields for a batch: prompts, responses, input_ids, attention_mask, position_ids,
    response_mask, rollout_log_probs and, when the rollouts carry routes, routed_experts.

    Lengths default to the batch's longest prompt and response (verl pads to its
    configured ``data.max_prompt_length`` / ``rollout.response_length``; pass those).
    Either every rollout carries routes or none does: a batch where some rows
    would silently route natively is refused.
    """
    if not rollouts:
        raise ValueError("rollouts_to_verl_fields needs at least one rollout")
    without = [i for i, r in enumerate(rollouts) if r.routed_experts is None]
    if without and len(without) != len(rollouts):
        raise ValueError(f"rollouts {without} have no routed_experts while the others do; capture routes for all or none")
    for i, r in enumerate(rollouts):
        if len(r.output_logprobs) != len(r.output_ids):
            raise ValueError(f"rollout {i} has {len(r.output_ids)} output tokens but {len(r.output_logprobs)} logprobs")
    prompt_width = max(len(r.prompt_ids) for r in rollouts) if prompt_length is None else prompt_length
    response_width = max(len(r.output_ids) for r in rollouts) if response_length is None else response_length
    batch = pad_batch(
        rollouts, spec, prompt_length=prompt_width, response_length=response_width, pad_token_id=pad_token_id
    )
    logprobs = torch.zeros((len(rollouts), response_width), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        logprobs[i, : len(r.output_logprobs)] = torch.tensor(r.output_logprobs, dtype=torch.float32)
    fields = {
        "prompts": batch.input_ids[:, :prompt_width],
        "responses": batch.input_ids[:, prompt_width:],
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "response_mask": batch.attention_mask[:, prompt_width:],
        "rollout_log_probs": logprobs,
    }
    if not without:
        fields[ROUTES_FIELD] = to_verl_layers(batch.routes, spec)
    return fields
