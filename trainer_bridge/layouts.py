"""Lay rollout routes out exactly like the trainer lays out the tokens.

A route row belongs to one token; whatever padding or packing the trainer
applies to ``input_ids`` must be applied to the routes the same way, or every
row lands on a neighbour's token (the silent off-by-one the guard exists for).

* :func:`pad_batch` — verl's padded layout: prompts left-padded to
  ``prompt_length``, responses right-padded to ``response_length``, one
  ``[batch, prompt_length + response_length]`` tensor.
* :func:`unpad_routes` — remove-padding: keep the rows where
  ``attention_mask`` is set, flattened in the same row-major order as the tokens.
* :func:`pack_batch` — position_ids packing: sequences back to back in one row,
  positions restarting at 0 for each.

Padding, the final token of each sequence (it has no successor to predict, and
engines capture no row for it) and positions the rollout did not capture are
``-1``: they route natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rollout.moe_spec import MoESpec
from rollout.types import Rollout
from trainer_bridge.replay import NO_ROUTE


def sequence_routes(rollout: Rollout, spec: MoESpec, index: int = 0) -> torch.Tensor:
    """int64 ``[num_tokens, L, K]`` for prompt + output: the rollout's rows at their positions, ``-1`` elsewhere."""
    n = rollout.num_tokens
    dense = torch.full((n, len(spec.moe_layers), spec.top_k), NO_ROUTE, dtype=torch.int64)
    routes = rollout.routed_experts
    if routes is None:
        return dense
    spec.check(routes, what=f"routes of rollout {index}")
    if routes.end > n:
        raise ValueError(f"routes of rollout {index} cover positions [{routes.start}, {routes.end}) but it has {n} tokens")
    dense[routes.start : routes.end] = routes.to_torch()
    dense[n - 1] = NO_ROUTE
    return dense


@dataclass
class PaddedBatch:
    """verl's layout: ``[batch, prompt_length + response_length]`` tokens and ``[..., L, K]`` routes."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    routes: torch.Tensor


def pad_batch(
    rollouts: Sequence[Rollout],
    spec: MoESpec,
    *,
    prompt_length: int | None = None,
    response_length: int | None = None,
    pad_token_id: int = 0,
) -> PaddedBatch:
    """Left-pad prompts and right-pad responses; lengths default to the longest in the batch."""
    if not rollouts:
        raise ValueError("pad_batch needs at least one rollout")
    longest_prompt = max(len(r.prompt_ids) for r in rollouts)
    longest_response = max(len(r.output_ids) for r in rollouts)
    p = longest_prompt if prompt_length is None else prompt_length
    r = longest_response if response_length is None else response_length
    if p < longest_prompt or r < longest_response:
        raise ValueError(
            f"prompt_length={p} / response_length={r} are shorter than the batch's longest prompt "
            f"({longest_prompt}) / response ({longest_response})"
        )
    batch = len(rollouts)
    input_ids = torch.full((batch, p + r), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch, p + r), dtype=torch.int64)
    routes = torch.full((batch, p + r, len(spec.moe_layers), spec.top_k), NO_ROUTE, dtype=torch.int64)
    for i, rollout in enumerate(rollouts):
        seq = sequence_routes(rollout, spec, i)
        np_, nr = len(rollout.prompt_ids), len(rollout.output_ids)
        cols = torch.cat([torch.arange(p - np_, p), torch.arange(p, p + nr)])
        input_ids[i, cols] = torch.tensor(rollout.token_ids, dtype=torch.int64)
        attention_mask[i, cols] = 1
        routes[i, cols] = seq
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(input_ids, attention_mask, position_ids, routes)


def unpad_routes(routes: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Remove-padding: ``[1, nnz, L, K]``, the rows of ``input_ids[attention_mask.bool()]`` in the same order."""
    if tuple(routes.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"routes cover tokens {list(routes.shape[:2])} but attention_mask is {list(attention_mask.shape)}")
    return routes[attention_mask.bool()].unsqueeze(0)


@dataclass
class PackedBatch:
    """Sequences back to back in one row; ``cu_seqlens[i]`` is where sequence ``i`` starts."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    routes: torch.Tensor


def pack_batch(rollouts: Sequence[Rollout], spec: MoESpec) -> PackedBatch:
    """position_ids packing (``[1, total]``): positions restart at 0 per sequence, routes follow their tokens."""
    if not rollouts:
        raise ValueError("pack_batch needs at least one rollout")
    lengths = torch.tensor([r.num_tokens for r in rollouts], dtype=torch.int64)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    input_ids = torch.tensor([t for r in rollouts for t in r.token_ids], dtype=torch.int64).unsqueeze(0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    routes = torch.cat([sequence_routes(r, spec, i) for i, r in enumerate(rollouts)]).unsqueeze(0)
    return PackedBatch(input_ids, position_ids, cu_seqlens, routes)
