"""Read verl's ``routed_experts`` field and lay it out like the tokens the FSDP engine feeds the model.

verl stores routes as int16 ``[batch, prompt_len + response_len, num_hidden_layers, top_k]``:
prompt left-padded, response right-padded, dense layers and every position the
rollout did not route written as **zeros**. Remove-padding
(``left_right_2_no_padding``) turns it into a nested (jagged) tensor holding only
the rows where ``attention_mask`` is 1.

Zeros are also expert 0, so "no route" is recovered from structure, never from
the value alone:

* padding: ``attention_mask == 0`` (padded form) or already dropped (nested form);
* the final token of each sequence: the last attended position, whose successor
  was never sampled, so no engine routed it;
* any other all-zero ``(token, layer)`` row when ``top_k >= 2``: a real top-k
  never repeats an expert, so ``[0, 0, ...]`` can only be verl's filler (trailing
  rows of multi-turn loops that stopped capturing). With ``top_k == 1`` such a
  row is indistinguishable from expert 0 and is replayed as expert 0.

Every "no route" row becomes ``-1``, trainer_bridge's "route natively" marker.
"""

from __future__ import annotations

import torch

from rollout.moe_spec import MoESpec
from trainer_bridge.replay import NO_ROUTE

ROUTES_FIELD = "routed_experts"
# The verl config keys an error should point at when routes and model disagree.
ROLLOUT_ROUTES_KEY = "actor_rollout_ref.rollout.enable_rollout_routing_replay"
MODEL_PATH_KEY = "actor_rollout_ref.model.path"


def check_verl_routes(routed_experts: torch.Tensor, spec: MoESpec) -> None:
    """``ValueError`` unless the field is ``[batch, seq, num_hidden_layers, top_k]`` integers for this model."""
    if routed_experts.dtype.is_floating_point or routed_experts.dtype == torch.bool:
        raise ValueError(f"batch field {ROUTES_FIELD!r} must hold integer expert ids, got {routed_experts.dtype}")
    if routed_experts.dim() != 4:
        raise ValueError(
            f"batch field {ROUTES_FIELD!r} must be [batch, seq, num_hidden_layers, top_k], got {routed_experts.dim()} dims"
        )
    layers, top_k = routed_experts.shape[-2], routed_experts.shape[-1]
    if layers != spec.num_hidden_layers:
        raise ValueError(
            f"batch field {ROUTES_FIELD!r} has {layers} layers but the model at {MODEL_PATH_KEY} has "
            f"num_hidden_layers={spec.num_hidden_layers}: the rollout that filled it "
            f"({ROLLOUT_ROUTES_KEY}) served another model"
        )
    if top_k != spec.top_k:
        raise ValueError(
            f"batch field {ROUTES_FIELD!r} has top_k={top_k} but the model at {MODEL_PATH_KEY} routes "
            f"num_experts_per_tok={spec.top_k}: the rollout that filled it ({ROLLOUT_ROUTES_KEY}) served another model"
        )


def _drop_filler(ids: torch.Tensor) -> torch.Tensor:
    """All-zero rows are verl's filler when ``top_k >= 2`` (a real top-k never repeats an id)."""
    if ids.shape[-1] >= 2:
        ids[(ids == 0).all(-1)] = NO_ROUTE
    return ids


def routes_from_padded(routed_experts: torch.Tensor, attention_mask: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """verl's padded field -> int64 ``[batch, seq, num_moe_layers, top_k]`` with ``-1`` for every row not to replay."""
    check_verl_routes(routed_experts, spec)
    if tuple(routed_experts.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(
            f"batch field {ROUTES_FIELD!r} covers tokens {list(routed_experts.shape[:2])} "
            f"but attention_mask is {list(attention_mask.shape)}"
        )
    ids = routed_experts[:, :, list(spec.moe_layers)].to(torch.int64)
    routed = attention_mask.bool().clone()
    seq_len = routed.shape[1]
    has_tokens = routed.any(1)
    final = seq_len - 1 - routed.flip(1).to(torch.int8).argmax(1)
    rows = torch.arange(routed.shape[0], device=routed.device)
    routed[rows[has_tokens], final[has_tokens]] = False
    ids[~routed] = NO_ROUTE
    return _drop_filler(ids)


def routes_from_nested(routed_experts: torch.Tensor, input_ids: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """verl's remove-padding field (nested, aligned with nested ``input_ids``) -> int64 ``[total_tokens, L, K]``.

    Rows follow ``input_ids.values()``; the last row of each sequence is ``-1``.
    """
    if not (routed_experts.is_nested and input_ids.is_nested):
        raise ValueError(f"routes_from_nested needs nested {ROUTES_FIELD!r} and input_ids (verl's remove-padding form)")
    check_verl_routes(routed_experts, spec)
    lengths, token_lengths = routed_experts.offsets().diff(), input_ids.offsets().diff()
    if not torch.equal(lengths.cpu(), token_lengths.cpu()):
        raise ValueError(
            f"batch field {ROUTES_FIELD!r} has sequence lengths {lengths.tolist()} but input_ids has "
            f"{token_lengths.tolist()}: routes and tokens were padded or packed differently"
        )
    ids = routed_experts.values()[:, list(spec.moe_layers)].to(torch.int64)
    ends = input_ids.offsets()[1:].to(ids.device)
    ids[ends[lengths.to(ids.device) > 0] - 1] = NO_ROUTE
    return _drop_filler(ids)


def packed_model_routes(flat: torch.Tensor, packed_len: int) -> torch.Tensor:
    """``[1, packed_len, L, K]`` for the engine's remove-padding input: the tokens, then ``-1`` for its tail pad."""
    pad = packed_len - flat.shape[0]
    if pad < 0:
        raise ValueError(f"the packed input has {packed_len} tokens but the routes cover {flat.shape[0]}")
    tail = flat.new_full((pad, *flat.shape[1:]), NO_ROUTE)
    return torch.cat([flat, tail]).unsqueeze(0)


def padded_model_routes(flat: torch.Tensor, input_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, seq_len, L, K]`` for the engine's right-padded input (no remove-padding); pad rows ``-1``."""
    nested = torch.nested.nested_tensor_from_jagged(flat, offsets=input_ids.offsets().to(flat.device))
    return torch.nested.to_padded_tensor(nested, padding=NO_ROUTE, output_size=(input_ids.shape[0], seq_len, *flat.shape[1:]))


def to_verl_layers(moe_routes: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """trainer_bridge routes ``[..., L, K]`` -> verl's int16 ``[..., num_hidden_layers, K]``; dense layers and ``-1`` as 0."""
    full = moe_routes.new_zeros((*moe_routes.shape[:-2], spec.num_hidden_layers, moe_routes.shape[-1]), dtype=torch.int16)
    full[..., list(spec.moe_layers), :] = moe_routes.clamp(min=0).to(torch.int16)
    return full
