"""Replay counters: what one verl ``forward_backward_batch`` actually replayed, measured at the experts.

``trainer_bridge.replay`` hands each MoE block the given ids; these counters
check, from a forward pre-hook on every block's ``experts`` child, that those
ids are what the experts were called with. transformers 5 calls every MoE
family's experts as ``experts(hidden_states, top_k_index, top_k_weights)``; a
call whose second argument is not a ``[tokens, top_k]`` integer tensor is left
unmeasured (``match`` is then ``None``) rather than guessed at.

Per micro-batch, on the first forward only (not the activation-checkpoint
recompute, which replays the same context):

* ``replayed``: ``(token, MoE layer)`` rows given as routes (not ``-1``);
* ``matched``: of those, rows whose expert set equals the given set;
* ``agreement``: trainer_bridge's guard, the trainer's own router against the
  given ids (slot overlap, mean over the layers it judged). It is below 1
  wherever rollout and trainer numerics flip a near-tie: exactly what R3 replays away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer_bridge.replay import NO_ROUTE, ReplaySession
from trainer_bridge.routers import in_checkpoint_recompute, moe_blocks_of


@dataclass
class MicroBatchCount:
    replayed: int
    matched: int | None
    agreement: float | None


@dataclass
class ExpertProbe:
    """Counts, for one micro-batch, the replayed rows whose ids reached the experts unchanged."""

    flat_routes: torch.Tensor  # [tokens, num_moe_layers, top_k], -1 rows route natively
    replayed: torch.Tensor
    matched: torch.Tensor
    measured_layers: set[int] = field(default_factory=set)
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, module: nn.Module, routes: torch.Tensor) -> "ExpertProbe":
        flat = routes.reshape(-1, *routes.shape[-2:])
        zero = torch.zeros((), dtype=torch.int64, device=flat.device)
        probe = cls(flat, zero.clone(), zero.clone())
        _, blocks = moe_blocks_of(module)
        for block in blocks:
            if len(block.experts) == 1:  # one experts module, called as experts(hidden, top_k_index, top_k_weights)
                probe.handles.append(block.experts[0].register_forward_pre_hook(probe._hook(block.row)))
        return probe

    def _hook(self, row: int):
        def on_experts(module: nn.Module, args: tuple[Any, ...]) -> None:
            if in_checkpoint_recompute():  # counted on the first pass
                return
            given = self.flat_routes[:, row]
            ids = args[1] if len(args) > 1 else None
            if not (isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and tuple(ids.shape) == tuple(given.shape)):
                return
            with torch.no_grad():
                routed = given[:, 0] != NO_ROUTE
                same = (ids.sort(-1).values == given.to(ids.device, ids.dtype).sort(-1).values).all(-1)
                self.replayed += routed.sum().to(self.replayed.device)
                self.matched += (same & routed).sum().to(self.matched.device)
            self.measured_layers.add(row)

        return on_experts

    def finish(self, session: ReplaySession, num_moe_layers: int) -> MicroBatchCount:
        """Detach and read the counts (one host sync per micro-batch)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        agreement = session.agreement
        mean_agreement = sum(agreement.values()) / len(agreement) if agreement else None
        if len(self.measured_layers) != num_moe_layers:
            routed = int((self.flat_routes[:, :, 0] != NO_ROUTE).sum())
            return MicroBatchCount(routed, None, mean_agreement)
        return MicroBatchCount(int(self.replayed), int(self.matched), mean_agreement)


@dataclass
class ReplayTally:
    """All micro-batches of one ``forward_backward_batch``."""

    counts: list[MicroBatchCount] = field(default_factory=list)

    @property
    def replayed(self) -> int:
        return sum(c.replayed for c in self.counts)

    @property
    def matched(self) -> int | None:
        """Replayed rows whose ids reached the experts as given (``None``: not measurable on this model)."""
        if not self.counts or any(c.matched is None for c in self.counts):
            return None
        return sum(c.matched for c in self.counts)

    @property
    def match(self) -> float | None:
        """Share of replayed rows whose ids reached the experts as given."""
        matched, replayed = self.matched, self.replayed
        return matched / replayed if matched is not None and replayed else None

    @property
    def agreement(self) -> float | None:
        values = [c.agreement for c in self.counts if c.agreement is not None]
        return sum(values) / len(values) if values else None
