"""What runs next: continuous batching over the KV pool, on host state only.

The scheduler never waits for the device. Under overlap it plans step N+1 while
step N's tokens are still unknown: a request whose last token is in flight is fed a
*placeholder* (``-(row + 1)``) that the device resolves from its future-token buffer.
It knows how many tokens each request will have (``inflight_samples``), so
``max_new_tokens`` and the context limit are never overshot; only a stop token is
learned one step late (the engine discards that extra token).

Policy (SGLang's default): prefill first (continuing chunked prefills, then admitting
waiting requests FIFO within ``max_batch_tokens``, free rows and free slots), else one
decode token for every running request. When the pool runs dry the newest running
request is preempted: its routes are copied into the request, its KV goes to the
prefix cache (evictable, so the resume may reuse what survives), and it goes back to
the front of the queue. Preemption needs every finalize done, so with steps in
flight the scheduler answers ``BLOCKED`` and the engine drains first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rollout.engine.kvcache import PrefixCache, PrefixMatch, RequestTable, SlotAllocator
from rollout.types import SamplingParams

BLOCKED = "blocked"


@dataclass(eq=False)
class Request:
    rid: int
    prompt_ids: list[int]
    sampling: SamplingParams
    start_len: int
    seed: int
    output_budget: int  # min(max_new_tokens, context limit - prompt)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    row: int | None = None  # request-table row while it holds KV
    slots: list[int] = field(default_factory=list)  # KV slot of positions [0, len(slots))
    prefix: PrefixMatch | None = None  # locked prefix-cache match behind slots[:prefix.num_tokens]
    table_synced: int = 0  # device request table holds slots[:table_synced] for this row
    inflight_samples: int = 0  # launched, unprocessed steps that sample a token for this request
    inflight_steps: int = 0  # launched, unprocessed steps that feed tokens of this request
    # routes of positions [0, routes_copied), copied out of the slot-keyed host cache into the request's own
    # array (rollout/engine/engine.py: while the device runs a step, before a preemption frees the slots, at finish)
    routes: np.ndarray | None = None
    routes_copied: int = 0
    routes_final: int = 0  # the host cache holds final routes of positions [0, routes_final) in this request's slots
    finish_reason: str | None = None
    abort_requested: bool = False
    error: str | None = None  # set when serving this request failed: it leaves as an abort, its KV uncached
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0  # tokens served from the prefix cache, over all admissions

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int | None:
        """The token at ``position``, or None while it is still being sampled (in flight)."""
        n = len(self.prompt_ids)
        if position < n:
            return self.prompt_ids[position]
        return self.output_ids[position - n] if position - n < len(self.output_ids) else None

    @property
    def num_pending(self) -> int:
        """Tokens not yet fed through the model (the last one may still be in flight)."""
        return self.num_known + self.inflight_samples - len(self.slots)

    @property
    def wants_more(self) -> bool:
        return (
            self.finish_reason is None
            and not self.abort_requested
            and len(self.output_ids) + self.inflight_samples < self.output_budget
        )


@dataclass
class Batch:
    """A host plan of one forward: flat tokens of every scheduled request chunk."""

    requests: list[Request]
    rows: np.ndarray  # [B] request-table row of each chunk
    extend_lens: list[int]
    samples: list[bool]  # does this chunk end at the request's newest token (so it samples)?
    input_ids: np.ndarray  # [N] int64; negative = placeholder -(row + 1)
    positions: np.ndarray  # [N] int64
    out_cache_loc: np.ndarray  # [N] int64: slot each token's KV (and routes) go to
    table_rows: np.ndarray  # request-table entries to write this step
    table_cols: np.ndarray
    table_slots: np.ndarray


class Scheduler:
    def __init__(
        self,
        slots: SlotAllocator,
        table: RequestTable,
        prefix_cache: PrefixCache | None,
        max_batch_tokens: int,
        snapshot_routes: Callable[[Request], None],
    ) -> None:
        self.slots = slots
        self.table = table
        self.prefix_cache = prefix_cache
        self.max_batch_tokens = max_batch_tokens
        self._snapshot_routes = snapshot_routes
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the newest is preempted first
        self.prefix_hit_tokens = 0
        self.computed_tokens = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------ scheduling
    def schedule(self, can_preempt: bool) -> Batch | str | None:
        """The next batch; ``BLOCKED`` if only a preemption would make room; ``None`` if idle."""
        while True:
            chunks = self._prefill_chunks()
            if chunks:
                return self._build(chunks)
            decodes = [r for r in self.running if r.num_pending == 1 and r.wants_more][: self.max_batch_tokens]
            if decodes and self._make_room(len(decodes)):
                return self._build([(r, 1) for r in decodes])
            stuck = any(r.num_pending >= 1 and r.wants_more for r in self.running)
            if not stuck:
                return None
            if not can_preempt:
                return BLOCKED
            if len(self.running) == 1:
                raise RuntimeError("a lone request does not fit the KV pool; add_request should have refused it")
            self.preempt(self.running[-1])

    def _prefill_chunks(self) -> list[tuple[Request, int]]:
        budget = self.max_batch_tokens
        chunks: list[tuple[Request, int]] = []
        planned = 0  # slots this batch will take (allocated in _build)
        # keep one slot per running decoder so admitting never forces an immediate preemption
        reserve = sum(1 for x in self.running if x.wants_more)
        for r in self.running:  # continue chunked prefills first
            if r.num_pending > 1 and r.wants_more and budget > 0:
                n = min(r.num_pending, budget)
                if not self._make_room(planned + n):
                    break
                chunks.append((r, n))
                budget -= n
                planned += n
        while self.waiting and budget > 0 and self.table.num_free > 0:
            r = self.waiting[0]
            n = self._admit(r, budget, planned + reserve)
            if n == 0:
                break
            reserve += 1
            self.waiting.popleft()
            self.running.append(r)
            chunks.append((r, n))
            budget -= n
            planned += n
        return chunks

    def _admit(self, r: Request, budget: int, held_back: int) -> int:
        """Give ``r`` a row, its cached prefix and slots for its first chunk; 0 if it does not fit.

        ``held_back`` slots are spoken for: this batch's other chunks and the running decoders.
        """
        tokens = r.token_ids()
        match = self.prefix_cache.match(tokens[:-1]) if self.prefix_cache is not None else None
        hit = match.num_tokens if match is not None else 0
        if match is not None:
            self.prefix_cache.lock(match)
        n = min(len(tokens) - hit, budget)
        if not self._make_room(held_back + n):
            if match is not None:
                self.prefix_cache.unlock(match)
            return 0
        r.row = self.table.alloc()
        r.prefix = match
        r.slots = list(match.slots) if match is not None else []
        r.table_synced = 0
        self.prefix_hit_tokens += hit
        r.prefix_hit_tokens += hit
        return n

    def _make_room(self, n: int) -> bool:
        """True if ``n`` slots are free, evicting unlocked prefix-cache entries if needed."""
        short = n - self.slots.num_free
        if short > 0 and self.prefix_cache is not None:
            self.slots.free(self.prefix_cache.evict(short))
        return self.slots.num_free >= n

    def _build(self, chunks: list[tuple[Request, int]]) -> Batch:
        ids, pos, loc, t_rows, t_cols, t_slots, samples = [], [], [], [], [], [], []
        for r, n in chunks:
            begin = len(r.slots)
            new = self.slots.alloc(n)
            r.slots.extend(new)
            for p in range(begin, begin + n):
                tok = r.token_at(p)
                ids.append(tok if tok is not None else -(r.row + 1))
            pos.extend(range(begin, begin + n))
            loc.extend(new)
            t_rows.extend([r.row] * (len(r.slots) - r.table_synced))
            t_cols.extend(range(r.table_synced, len(r.slots)))
            t_slots.extend(r.slots[r.table_synced :])
            r.table_synced = len(r.slots)
            sample = r.num_pending == 0
            if sample:
                r.inflight_samples += 1
            r.inflight_steps += 1
            samples.append(sample)
            self.computed_tokens += n

        def arr(x: list[int]) -> np.ndarray:
            return np.asarray(x, dtype=np.int64)

        return Batch(
            requests=[r for r, _ in chunks], rows=arr([r.row for r, _ in chunks]), extend_lens=[n for _, n in chunks], samples=samples,
            input_ids=arr(ids), positions=arr(pos), out_cache_loc=arr(loc),
            table_rows=arr(t_rows), table_cols=arr(t_cols), table_slots=arr(t_slots),
        )

    # ------------------------------------------------------- state changes
    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def preempt(self, r: Request) -> None:
        """Requeue ``r`` at the front; its routes so far are copied into the request. Needs no step in flight."""
        assert r.inflight_steps == 0, "preemption needs the request's steps finalized"
        self._snapshot_routes(r)
        self._release_kv(r, keep_in_cache=len(r.slots))  # cached, so the resume may skip recomputing it
        self.running.remove(r)
        self.waiting.appendleft(r)
        r.num_preemptions += 1
        self.num_preemptions += 1

    def finish(self, r: Request, reason: str) -> None:
        """Free ``r``'s KV; its computed positions go to the prefix cache (with their routes), unless it failed."""
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
            keep = min(len(r.slots), r.num_known - 1) if r.error is None else 0  # a failed step may have left bad KV
            self._release_kv(r, keep_in_cache=keep)
        elif r in self.waiting:
            self.waiting.remove(r)

    def _release_kv(self, r: Request, keep_in_cache: int) -> None:
        """Hand ``slots[:keep_in_cache]`` (finalized KV and routes) to the prefix cache, free the rest."""
        cached = r.prefix.num_tokens if r.prefix is not None else 0
        if self.prefix_cache is not None and keep_in_cache > cached:
            tokens = r.token_ids()[:keep_in_cache]
            self.slots.free(self.prefix_cache.insert(tokens, r.slots[:keep_in_cache]))
            self.slots.free(r.slots[keep_in_cache:])
        else:
            self.slots.free(r.slots[cached:])
        if r.prefix is not None:
            self.prefix_cache.unlock(r.prefix)
        if r.row is not None:
            self.table.free(r.row)
        r.row, r.slots, r.prefix, r.table_synced = None, [], None, 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
