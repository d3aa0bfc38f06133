"""Misalignment guard: is the trainer's own router even close to the routes being replayed?

Correct routes come from the same weights, so the trainer's native top-k
mostly agrees with them (rollout/trainer numerics only flip near-ties).
Routes shifted by one token, taken from another sequence or recorded on
another model are unrelated to the trainer's scores, so the overlap falls to
what random top-k sets give: ``top_k / num_experts`` per expert slot.

The statistic is the *slot overlap* ``|native ∩ replayed| / top_k`` averaged
over a layer's routed rows. The default threshold sits two thirds of the way
from chance to perfect agreement: ``chance + 2 (1 - chance) / 3`` (0.75 for 2 of 8
experts, 0.69 for 8 of 128). Measured on the seven tiny presets (fp32 trainer,
routes recorded on a bf16 copy, 4 x 64 random tokens): correct routes 0.99 to
1.0 per layer; shifted by one token either way 0.25 to 0.48; from another
sequence 0.19 to 0.28. With only 48 rows a shifted layer reached 0.59, so the
midpoint (0.625 for 2 of 8) would sit too close to noise; two thirds of the
way leaves about 0.25 of margin on both sides.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

GUARD_MODES = ("warn", "raise", "off")
# Fewer routed rows than this in a layer say too little to judge it (noise of a 2-of-8 overlap over 32 rows ~ 0.07).
MIN_GUARD_ROWS = 32


class RouteMisalignmentWarning(UserWarning):
    """Replayed routes look unrelated to the tokens they are replayed on."""


class RouteMisalignmentError(ValueError):
    """Raised instead of the warning when the guard is set to ``"raise"``."""


def chance_overlap(top_k: int, num_experts: int) -> float:
    """Expected slot overlap of two independent uniformly random top-k sets."""
    return top_k / num_experts


def default_threshold(top_k: int, num_experts: int) -> float:
    chance = chance_overlap(top_k, num_experts)
    return chance + 2.0 * (1.0 - chance) / 3


def slot_overlap(native: torch.Tensor, replayed: torch.Tensor) -> torch.Tensor:
    """Per row ``[N]``: share of replayed ids that the native top-k also picked (order-free)."""
    hits = (replayed.unsqueeze(-1) == native.unsqueeze(-2)).any(-1)
    return hits.float().mean(-1)


@dataclass
class RoutingGuard:
    """Accumulates per-layer overlap over one model forward, then judges it in :meth:`check`."""

    mode: str
    top_k: int
    num_experts: int
    layers: tuple[int, ...]
    threshold: float | None = None
    min_rows: int = MIN_GUARD_ROWS
    # per MoE layer row: (sum of overlaps, routed rows) as device tensors, so updates never sync with the GPU
    _totals: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in GUARD_MODES:
            raise ValueError(f"guard must be one of {GUARD_MODES}, got {self.mode!r}")
        if self.threshold is None:
            self.threshold = default_threshold(self.top_k, self.num_experts)
        try:
            in_range = 0.0 <= self.threshold <= 1.0
        except TypeError:  # not a number: the same clear error as one out of range
            in_range = False
        if not in_range:
            raise ValueError(f"guard_threshold must be in [0, 1], got {self.threshold!r}")

    def update(self, row: int, native: torch.Tensor, replayed: torch.Tensor, routed: torch.Tensor) -> None:
        """Add the routed rows (``routed`` mask ``[N]``) of MoE layer ``row``; ``"off"`` measures nothing."""
        if self.mode == "off":
            return
        with torch.no_grad():
            overlap = slot_overlap(native, replayed) * routed
            total, rows = overlap.sum(), routed.sum()
            if row in self._totals:
                total, rows = total + self._totals[row][0], rows + self._totals[row][1]
        self._totals[row] = (total, rows)

    def start(self) -> None:
        """Forget a forward that never finished (it raised), so it cannot mix into the next one."""
        self._totals.clear()

    def check(self) -> None:
        """Judge the forward just finished (one host sync); warn or raise if any layer is near chance."""
        rows = sorted(self._totals)
        pairs = [torch.stack([t, n.to(t.dtype)]) for t, n in (self._totals[r] for r in rows)]
        totals = torch.stack(pairs).tolist() if pairs else []
        self._totals.clear()
        self.last = {self.layers[r]: t / n for r, (t, n) in zip(rows, totals) if n >= self.min_rows}
        bad = {layer: round(v, 3) for layer, v in self.last.items() if v < self.threshold}
        if not bad:
            return
        message = (
            f"replayed routes disagree with the trainer's own router: native/replayed top-{self.top_k} overlap per "
            f"layer {bad} is below {self.threshold:.3f} (chance is {chance_overlap(self.top_k, self.num_experts):.3f}); "
            "routes are probably shifted by a token, from another sequence, or from another model"
        )
        if self.mode == "raise":
            raise RouteMisalignmentError(message)
        warnings.warn(message, RouteMisalignmentWarning, stacklevel=3)
