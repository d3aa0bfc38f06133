"""R3 replay and R2 record for transformers MoE models.

Two explicit actions, like Megatron-core's router replay:

* :func:`replay` — inside the context every MoE block selects the given
  experts; gate weights still come from the trainer's router (see
  ``routers.py``). Rows marked ``-1`` route natively.
* :func:`record` — inside the context the trainer's own selections are kept,
  shaped like the routes :func:`replay` takes (R2: record on the old-logprob
  pass, replay on the update passes).

Routes belong to the context, not to a call count: every block forward inside
the context, first pass or activation-checkpoint recompute (reentrant or not),
selects from the same route tensor, so micro-batches use one context each and
the backward of a checkpointed forward must run inside the same context (or a
new ``replay`` with the same routes). Nothing depends on how often a router runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

from rollout.moe_spec import MoESpec
from rollout.routed_experts import RoutedExperts
from trainer_bridge.guard import RoutingGuard, SequenceAgreement
from trainer_bridge.routers import MoEBlock, SelectFn, TopK, in_checkpoint_recompute, intercept_selection, moe_blocks_of

Routes = Union[torch.Tensor, RoutedExperts, Sequence[RoutedExperts]]
NO_ROUTE = -1


def check_route_tensor(routes: torch.Tensor, spec: MoESpec) -> None:
    """``ValueError`` unless ``routes`` is ``[*tokens, num_moe_layers, top_k]`` of valid ids or whole ``-1`` rows."""
    if not isinstance(routes, torch.Tensor) or routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise ValueError(f"routes must be an integer tensor, got {type(routes).__name__} {getattr(routes, 'dtype', '')}")
    if routes.ndim < 3:
        raise ValueError(f"routes must be shaped like input_ids + (num_moe_layers, top_k), got shape {tuple(routes.shape)}")
    layers, top_k = routes.shape[-2:]
    if layers != len(spec.moe_layers):
        raise ValueError(
            f"routes have {layers} MoE layers but the model has {len(spec.moe_layers)} (layers {list(spec.moe_layers)}): "
            "were they recorded on another model?"
        )
    if top_k != spec.top_k:
        raise ValueError(f"routes have top_k={top_k} but the model routes top_k={spec.top_k}")
    if routes.numel() == 0:
        return
    missing = routes == NO_ROUTE
    srt = routes.sort(-1).values
    # one host sync for all four checks
    high, low, partial, repeated = torch.stack([
        routes.max(), routes.min(), (missing.any(-1) & ~missing.all(-1)).any(),
        ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != NO_ROUTE)).any(),
    ]).tolist()
    if high >= spec.num_experts:
        raise ValueError(f"expert id {high} >= num_experts={spec.num_experts}")
    if low < NO_ROUTE:
        raise ValueError(f"expert id {low} is negative; only {NO_ROUTE} (route natively) is allowed")
    if partial:
        raise ValueError(f"some routed rows are partly {NO_ROUTE}; a row is either all expert ids or all {NO_ROUTE}")
    if repeated:
        raise ValueError("some routed rows repeat an expert id")


def routes_from_routed_experts(parts: Sequence[RoutedExperts], token_shape: tuple[int, ...], spec: MoESpec) -> torch.Tensor:
    """Dense ``[batch, seq, L, K]`` routes: row ``i`` of the batch is sequence ``parts[i]``, unpadded (position p at column p)."""
    if len(token_shape) != 2 or token_shape[0] != len(parts):
        raise ValueError(f"{len(parts)} RoutedExperts need input_ids of shape [{len(parts)}, seq], got {list(token_shape)}")
    dense = torch.full((*token_shape, len(spec.moe_layers), spec.top_k), NO_ROUTE, dtype=torch.int64)
    for i, part in enumerate(parts):
        if part.end > token_shape[1]:
            raise ValueError(f"routes of row {i} cover positions [{part.start}, {part.end}) but the row has {token_shape[1]} tokens")
        dense[i, part.start : part.end] = part.to_torch()
    return dense


def _validated_source(routes: Routes, spec: MoESpec) -> torch.Tensor | list[RoutedExperts]:
    """Check everything that does not need the tokens, so bad routes fail before any forward."""
    if isinstance(routes, torch.Tensor):
        check_route_tensor(routes, spec)
        return routes
    parts = [routes] if isinstance(routes, RoutedExperts) else list(routes)
    if not parts or not all(isinstance(p, RoutedExperts) for p in parts):
        raise ValueError("routes must be an integer tensor, a RoutedExperts, or a non-empty list of RoutedExperts")
    for i, part in enumerate(parts):
        spec.check(part, what=f"routes of row {i}")
    return parts


def _token_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(input_ids, torch.Tensor):
        return tuple(input_ids.shape)
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return tuple(embeds.shape[:-1])
    raise ValueError("replay/record need the model called with input_ids or inputs_embeds")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _intercepting(
    model: nn.Module,
    blocks: list[MoEBlock],
    spec: MoESpec,
    select: SelectFn,
    pre: Callable[..., None],
    post: Callable[..., None] | None = None,
) -> Iterator[None]:
    """``select`` patched into every block, ``pre``/``post`` hooked (with kwargs) on the whole model, all undone on exit."""
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    if post is not None:
        handles.append(model.register_forward_hook(post, with_kwargs=True))
    try:
        with intercept_selection(blocks, spec, select):
            yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ReplaySession:
    """What a :func:`replay` context exposes: the guard's judgement of the last forward, per layer and per sequence."""

    guard: RoutingGuard
    spec: MoESpec
    _flat: torch.Tensor | None = None  # [num_tokens, L, K] on the model's device, for the current forward

    @property
    def agreement(self) -> dict[int, float]:
        """Model layer -> native/replayed slot overlap of the last forward (layers with enough routed rows)."""
        self.guard.check()
        return dict(self.guard.last)

    @property
    def sequence_agreement(self) -> list[SequenceAgreement]:
        """Per sequence (batch row, or packed segment) of the last forward: its pooled native/replayed overlap."""
        self.guard.check()
        return list(self.guard.sequences)

    def _select(self, block: MoEBlock, scores: torch.Tensor, native: TopK, unmasked: torch.Tensor) -> TopK:
        if self._flat is None:
            raise ValueError("replay routes were never bound to a forward: call the model passed to replay()")
        routes = self._flat[:, block.row]
        if routes.shape[0] != scores.shape[0]:  # scores are [tokens, E] (routers.py intercepts no other top-k)
            raise ValueError(f"{block.name} routes {scores.shape[0]} tokens but the replay routes cover {routes.shape[0]}")
        routed = routes[:, :1] != NO_ROUTE
        ids = torch.where(routed, routes, native.indices)
        if not in_checkpoint_recompute():  # a checkpoint recompute inside backward is not counted twice
            self.guard.update(block.row, native.indices, routes, routed[:, 0])
        # Routed rows take their gate scores from the unmasked scores (a replayed expert may sit in a group the
        # native choice masked out); native rows keep the native values exactly. Both are fresh tensors, not views:
        # routers that normalise the values in place (``/=``) then cost no extra autograd node.
        values = torch.where(routed, unmasked.gather(-1, ids), native.values)
        return TopK((values, ids))


def _sequence_hints(kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """position_ids and packed-sequence offsets (transformers' ``cu_seq_lens_q``) of a forward, if given."""
    position_ids = kwargs.get("position_ids")
    cu = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens"))
    return (
        position_ids if isinstance(position_ids, torch.Tensor) else None,
        cu if isinstance(cu, torch.Tensor) else None,
    )


@contextlib.contextmanager
def replay(
    model: nn.Module,
    routes: Routes,
    *,
    guard: str = "warn",
    guard_threshold: float | None = None,
) -> Iterator[ReplaySession]:
    """Inside the context, ``model``'s MoE routers select ``routes`` (``-1`` rows route natively).

    ``routes``: an integer tensor shaped like ``input_ids`` + ``(num_moe_layers, top_k)``; a
    ``RoutedExperts`` (batch of one); or a list of them, one per batch row, each covering
    positions ``[start, end)`` of its unpadded row. Everything except the token shape is
    checked here, before any forward; the token shape is checked when the model is called.

    The guard judges each forward per sequence (batch row, or packed segment where
    ``position_ids`` restart or ``cu_seq_lens_q`` says so) and per layer, lazily: when the next
    forward starts, when the context closes, or when ``session.agreement`` is read.
    """
    spec, blocks = moe_blocks_of(model)
    source = _validated_source(routes, spec)
    session = ReplaySession(RoutingGuard(guard, spec.top_k, spec.num_experts, spec.moe_layers, guard_threshold), spec)
    device = _model_device(model)

    def bind(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shape = _token_shape(args, kwargs)
        if isinstance(source, torch.Tensor):
            if tuple(source.shape[:-2]) != shape:
                raise ValueError(f"routes cover tokens of shape {list(source.shape[:-2])} but input_ids have shape {list(shape)}")
            dense = source
        else:
            dense = routes_from_routed_experts(source, shape, spec)
        session._flat = dense.reshape(-1, *dense.shape[-2:]).to(device=device, dtype=torch.int64)
        session.guard.start(shape, *_sequence_hints(kwargs), device=device)

    def finished(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        session.guard.finish()

    with _intercepting(model, blocks, spec, session._select, bind, finished):
        yield session
    session.guard.check()


@dataclass
class Recording:
    """Routes the trainer chose natively in the last forward inside :func:`record`."""

    spec: MoESpec
    token_shape: tuple[int, ...] = ()
    _layers: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def routes(self) -> torch.Tensor:
        """int64 ``[*token_shape, num_moe_layers, top_k]``, ready for :func:`replay`."""
        if len(self._layers) != len(self.spec.moe_layers):
            raise ValueError("nothing recorded: call the model inside record() first")
        stacked = torch.stack([self._layers[r] for r in range(len(self.spec.moe_layers))], dim=1)
        return stacked.reshape(*self.token_shape, *stacked.shape[1:])

    def _select(self, block: MoEBlock, scores: torch.Tensor, native: TopK, unmasked: torch.Tensor) -> TopK:
        self._layers[block.row] = native.indices.detach().reshape(-1, native.indices.shape[-1]).to(torch.int64)
        return native


@contextlib.contextmanager
def record(model: nn.Module) -> Iterator[Recording]:
    """Keep the native top-k of every MoE block; ``recording.routes`` replays them later (R2)."""
    spec, blocks = moe_blocks_of(model)
    recording = Recording(spec)

    def start(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recording.token_shape = _token_shape(args, kwargs)
        recording._layers.clear()

    with _intercepting(model, blocks, spec, recording._select, start):
        yield recording
