"""Misalignment guard: is the trainer's own router even close to the routes being replayed, sequence by sequence?

Correct routes come from the same weights, so the trainer's native top-k
mostly agrees with them (rollout/trainer numerics only flip near-ties).
Routes taken from another sequence or recorded on another model are unrelated
to the trainer's scores, so the overlap falls towards what unrelated top-k sets
give, ``top_k / num_experts`` per expert slot; routes shifted by one token
belong to the neighbouring token instead.

The statistic is the *slot overlap* ``|native ∩ replayed| / top_k`` of a
routed (token, layer) row. It is judged two ways after each forward:

* **per sequence**, pooled over the sequence's tokens and all MoE layers. A
  sequence is a batch row, or a segment of a packed row (positions restart at 0,
  or ``cu_seq_lens_q`` marks it). The realistic failures hit one sequence: one
  multi-turn sample off by one token, one row swapped with another. Averaged
  over a batch of 8 they keep every layer above 0.9; judged alone they fall.
  A sequence is flagged when its overlap is below the threshold (routes from
  another sequence or model), or when its routes fit the trainer's own choice
  *one token off* better than aligned, by more than ``SHIFT_MARGIN`` (a shift).
  The second test is needed because a shift keeps much of the overlap wherever
  neighbouring tokens route alike: on the unit-scale demo model a shifted
  sequence keeps 0.54 on average and up to 0.84, above any threshold that
  leaves room for rollout numerics, while its routes fit the trainer's choice
  one token off better than aligned (by 0.09 at least over 1,000 shifts) and
  correct routes fit it worse (by 0.15 at least; ``docs/benchmarks.md``).
* **per layer**, pooled over the batch: routes recorded on another model
  disagree in some layers for every sequence.

The default threshold sits two thirds of the way from chance to perfect
agreement: ``chance + 2 (1 - chance) / 3`` (0.75 for 2 of 8 experts, 0.69 for 8
of 128). Measured with ``bench/guard_detection.py`` (``docs/benchmarks.md``).

The reduction is lazy: a forward only keeps references to its ids; the
arithmetic, batched over all layers, and the judgement (two host syncs) happen
when the next forward starts, when the replay context closes, or when the
numbers are read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

GUARD_MODES = ("warn", "raise", "off")
# Fewer routed rows than this say too little to judge a sequence or a layer (noise of a 2-of-8 overlap over 16 rows
# is ~0.09, against a 0.5 gap between misaligned routes and the threshold).
MIN_GUARD_ROWS = 16
# A sequence whose routes fit the trainer's choice one token off better than aligned, by more than this, is shifted.
# Correct routes fit their own token better (by 0.15 at least on the demo model); on a run of one repeated token a
# shift is harmless and the two fits differ only by rollout noise (~0.01), which this margin leaves unflagged.
SHIFT_MARGIN = 0.05
# At most this many flagged sequences are spelled out in a message.
NAMED_SEQUENCES = 8


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
    """Per row ``[...]``: share of replayed ids that the native top-k also picked (order-free).

    One comparison per native slot: on CPU that is 2x faster than one broadcast ``[..., K, K]`` comparison.
    """
    hits = replayed == native[..., :1]
    for slot in range(1, native.shape[-1]):
        hits |= replayed == native[..., slot : slot + 1]
    return hits.float().mean(-1)


def sequence_ids(token_shape: tuple[int, ...], position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """``[num_tokens]`` int64: which sequence each flattened token belongs to, numbered in order (no host sync).

    A new sequence starts at each batch row, where ``cu_seqlens`` (offsets into the flattened tokens) says so,
    and where positions do not continue (``position_ids[t] != position_ids[t-1] + 1``: packing restarts at 0).
    Padding tokens may form sequences of their own; they have no routed rows and are never judged.
    """
    rows = token_shape[0] if len(token_shape) > 1 else 1
    cols = token_shape[-1] if token_shape else 1
    starts = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None and position_ids.numel() == rows * cols:
        pos = position_ids.to(device).reshape(-1, cols).expand(rows, cols)
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1)
    if cu_seqlens is not None:
        offsets = cu_seqlens.to(device=device, dtype=torch.int64)
        offsets = offsets[(offsets >= 0) & (offsets < flat.numel())]
        flat = flat.clone()
        flat[offsets] = True
    return flat.cumsum(0) - 1


@dataclass(frozen=True)
class SequenceAgreement:
    """One judged sequence's pooled overlap: ``row`` of the batch, tokens ``[start, end)`` of that row; ``index``
    numbers the judged sequences of the forward in order."""

    index: int
    row: int
    start: int
    end: int
    overlap: float
    rows: int  # routed (token, layer) rows it was judged on (at least the guard's ``min_rows``)
    # how much better the routes fit the trainer's choice one token off (the better of before / after) than aligned,
    # over rows whose neighbour is routed too (``None``: too few of them); negative for correct routes
    shift_gain: float | None = None

    @property
    def shifted(self) -> bool:
        return self.shift_gain is not None and self.shift_gain > SHIFT_MARGIN


@dataclass
class RoutingGuard:
    """Keeps each MoE layer's ids over one model forward; :meth:`check` measures and judges them."""

    mode: str
    top_k: int
    num_experts: int
    layers: tuple[int, ...]
    threshold: float | None = None
    min_rows: int = MIN_GUARD_ROWS
    last: dict[int, float] = field(default_factory=dict)  # model layer -> overlap, of the last judged forward
    sequences: list[SequenceAgreement] = field(default_factory=list)  # of the last judged forward
    # pending forward: token shape, sequence ids [N], and per MoE block call (row, native ids, replayed ids, routed)
    _pending: dict | None = None

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

    def start(self, token_shape: tuple[int, ...], position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
              device: torch.device) -> None:
        """Judge the previous forward, then open a new one over these tokens (sequences as :func:`sequence_ids`).

        A previous forward that never finished (it raised) is dropped, so it cannot mix into this one.
        """
        self.check()
        self._pending = None
        if self.mode == "off":
            return
        segments = sequence_ids(token_shape, position_ids, cu_seqlens, device)
        self._pending = {"shape": token_shape, "segments": segments, "calls": [], "finished": False}

    def finish(self) -> None:
        """The forward returned: its numbers are complete and may be judged."""
        if self._pending is not None:
            self._pending["finished"] = True

    def update(self, row: int, native: torch.Tensor, replayed: torch.Tensor, routed: torch.Tensor) -> None:
        """Keep MoE layer ``row``'s native ids, replayed ids ``[N, K]`` and routed mask ``[N]`` for :meth:`check`.

        Nothing is computed here: per layer the arithmetic is a few dozen small ops, which on a small model cost
        more than the replay itself; :meth:`check` does it once for all layers. The tensors are the interceptor's
        own (the model never sees the native ids), so keeping references is safe.
        """
        if self._pending is not None:
            self._pending["calls"].append((row, native, replayed, routed))

    def check(self) -> None:
        """Judge the pending forward (two host syncs); warn or raise naming the sequences and layers near chance."""
        p = self._pending
        if p is None or not p["finished"]:
            return
        self._pending = None
        seg = p["segments"]
        if seg.numel() == 0 or not p["calls"]:
            self.sequences, self.last = [], {}
            return
        nseg = int(seg[-1]) + 1  # sync 1: the sequence count sizes what comes back
        with torch.no_grad():
            per_seg, per_layer = self._reduce(seg, nseg, p["calls"])
        host = torch.cat([per_seg.T.flatten(), per_layer.T.flatten()]).tolist()  # sync 2
        sums, rows, before, after, pairs, first, last = (host[i * nseg : (i + 1) * nseg] for i in range(7))
        nl = len(self.layers)
        layer_sums, layer_rows = host[7 * nseg : 7 * nseg + nl], host[7 * nseg + nl :]
        cols = p["shape"][-1] if p["shape"] else 1
        # judged sequences only: padding tokens that form segments of their own carry too few rows to count
        judged = [i for i in range(nseg) if rows[i] >= self.min_rows]
        self.sequences = [
            SequenceAgreement(
                j, int(first[i]) // cols, int(first[i]) % cols, int(last[i]) % cols + 1, sums[i] / rows[i],
                int(rows[i]), max(before[i], after[i]) / pairs[i] if pairs[i] >= self.min_rows else None,
            )
            for j, i in enumerate(judged)
        ]
        self.last = {self.layers[r]: layer_sums[r] / layer_rows[r] for r in range(nl) if layer_rows[r] >= self.min_rows}
        self._judge()

    def _reduce(self, seg: torch.Tensor, nseg: int, calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence ``[nseg, 7]`` (float64): aligned overlap sum, routed rows, gains one token before / after
        (summed over rows whose neighbour in the sequence is routed too), those rows, first and last token;
        per layer ``[L, 2]``: aligned overlap sum, routed rows. All layers at once: a few dozen ops in all."""
        n, dev = seg.numel(), seg.device
        native, replayed = torch.stack([c[1] for c in calls]), torch.stack([c[2] for c in calls])  # [M, N, K]
        routed = torch.stack([c[3] for c in calls]).double()  # [M, N]
        # every row against the replayed ids aligned, one token before (rows 1..), one token after (rows ..n-2)
        hits = slot_overlap(torch.cat([native, native[:, 1:], native[:, :-1]], 1),
                            torch.cat([replayed, replayed[:, :-1], replayed[:, 1:]], 1)).double()
        aligned, before, after = hits.split([n, n - 1, n - 1], 1)
        pair = routed[:, 1:] * routed[:, :-1] * (seg[1:] == seg[:-1])  # rows t and t + 1, counted at t + 1
        overlap = aligned * routed
        token = torch.zeros(n, 7, dtype=torch.float64, device=dev)
        token[:, 0], token[:, 1] = overlap.sum(0), routed.sum(0)
        token[1:, 2:5] = torch.stack([(before - aligned[:, 1:]) * pair, (after - aligned[:, :-1]) * pair, pair], -1).sum(0)
        per_seg = torch.zeros(nseg, 7, dtype=torch.float64, device=dev).index_add_(0, seg, token)
        index = torch.arange(n, device=dev, dtype=torch.float64)
        per_seg[:, 5] = torch.full((nseg,), float(n), dtype=torch.float64, device=dev).scatter_reduce(0, seg, index, "amin")
        per_seg[:, 6] = torch.zeros(nseg, dtype=torch.float64, device=dev).scatter_reduce(0, seg, index, "amax")
        rows = torch.tensor([c[0] for c in calls], device=dev)
        per_layer = torch.zeros(len(self.layers), 2, dtype=torch.float64, device=dev)
        per_layer.index_add_(0, rows, torch.stack([overlap.sum(1), routed.sum(1)], 1))
        return per_seg, per_layer

    def flagged(self) -> list[SequenceAgreement]:
        """The sequences of the last judged forward that look misaligned: unrelated, or shifted by a token."""
        assert self.threshold is not None
        return [s for s in self.sequences if s.overlap < self.threshold or s.shifted]

    def _judge(self) -> None:
        assert self.threshold is not None
        judged = self.sequences
        bad_seqs = self.flagged()
        bad_layers = {layer: round(v, 3) for layer, v in self.last.items() if v < self.threshold}
        if not bad_seqs and not bad_layers:
            return
        chance = chance_overlap(self.top_k, self.num_experts)
        parts = []
        if bad_seqs:
            named = ", ".join(
                f"sequence {s.index} (row {s.row}, tokens {s.start}-{s.end - 1}): {s.overlap:.3f}"
                + (f", {s.shift_gain:+.3f} one token off" if s.shifted else "")
                for s in bad_seqs[:NAMED_SEQUENCES]
            )
            more = f", and {len(bad_seqs) - NAMED_SEQUENCES} more" if len(bad_seqs) > NAMED_SEQUENCES else ""
            parts.append(f"{len(bad_seqs)} of {len(judged)} sequences: {named}{more}")
        if bad_layers:
            parts.append(f"overlap per layer {bad_layers}")
        message = (
            f"replayed routes disagree with the trainer's own router (native/replayed top-{self.top_k} overlap below "
            f"{self.threshold:.3f}, chance {chance:.3f}, or more than {SHIFT_MARGIN} higher one token off than "
            "aligned) in " + "; ".join(parts) + ". Routes are probably shifted by a token, from another sequence, "
            "or from another model"
        )
        if self.mode == "raise":
            raise RouteMisalignmentError(message)
        warnings.warn(message, RouteMisalignmentWarning, stacklevel=4)
