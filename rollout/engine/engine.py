"""The engine loop: schedule, launch, process; with overlap the device runs step N+1
while the host processes step N.

``step()`` is the whole loop and reads top to bottom:

    batch = schedule()          # host only; in-flight tokens are placeholders
    launched = launch(batch)    # forward + sample + future-token write + async D2H copies + copy_done event
    process(previous)           # copy_done.synchronize -> finalize routes -> append tokens -> finish
    previous = launched

``overlap=False`` processes each step right after launching it. Both paths run the
same code on CPU, where the events are no-ops.

Fault isolation: a bad request is refused by ``add_request`` / ``generate`` (``ValueError``
naming the prompt) before anything is queued. An exception while serving one request inside
``step()`` fails that request alone: it comes back with finish_reason "abort" and the error in
``Rollout.meta["error"]``, its KV is freed without entering the prefix cache, and the engine
goes on with the others. A step that fails as a whole (its launch raised) fails the requests
in it the same way. ``generate`` never leaves its requests queued when it raises.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from rollout.engine import batch as batch_mod
from rollout.engine.capture import RouteCapture, RoutedExpertsOutput
from rollout.engine.colocation import ColocatedMemory
from rollout.engine.config import EngineConfig, checkpoint_dtype
from rollout.engine.cuda_graph import DecodeGraphs
from rollout.engine.kvcache import KVPool, PrefixCache, RequestTable, SlotAllocator
from rollout.engine.models import arch_from_config
from rollout.engine.memory import size_from_memory
from rollout.engine.models.model import Kernels, MoEModel
from rollout.engine.sampler import sample
from rollout.engine.scheduler import BLOCKED, Batch, Request, Scheduler
from rollout.engine.weight_update import Version, WeightSync, flush_caches
from rollout.moe_spec import MoESpec, read_config
from rollout.routed_experts import RoutedExperts
from rollout.types import ERROR_META_KEY, FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams

# Fewest final rows of a request's routes worth copying out of the host cache while a step runs:
# at one row per decode step each request copies every 16 steps, not every step (each copy is a numpy call).
ROUTE_COPY_ROWS = 16


@dataclass
class _Launched:
    """A step on the device: what the host must wait for and read back."""

    batch: Batch
    next_ids: torch.Tensor | None  # host (pinned) [S], valid after copy_done
    logprobs: torch.Tensor | None
    routes: RoutedExpertsOutput | None
    copy_done: torch.cuda.Event | None


class Engine:
    def __init__(self, model_path: str | os.PathLike, config: EngineConfig | None = None, **options: object) -> None:
        if config is not None and options:
            raise ValueError("pass either an EngineConfig or keyword options, not both")
        config = config if config is not None else EngineConfig.from_options(**options)
        cfg = read_config(model_path)
        arch = arch_from_config(cfg)  # unsupported family fails here, before any weight is read
        self.spec = MoESpec.from_config(cfg)
        c = self.config = config.resolved(checkpoint_dtype(cfg))  # device defaults; bad combinations fail here
        self.device = torch.device(c.device)
        kernels = Kernels(c.attention_backend, c.prefill_attention_backend, c.moe_backend, c.layer_kernels)
        self.model = MoEModel(model_path, self.device, getattr(torch, c.dtype), c.context_limit(arch.max_positions), kernels)
        self.config = size_from_memory(c, self.model.arch, self.model.dtype)  # kv_slots, max_running_requests
        self.max_context = self.config.context_limit(arch.max_positions)
        a = self.model.arch
        self.kv = KVPool(a.num_layers, self.config.kv_slots, a.num_kv_heads, a.head_dim, self.model.dtype, self.device)
        self.slots = SlotAllocator(self.config.kv_slots)
        self.table = RequestTable(self.config.max_running_requests, self.max_context, self.device)
        self.capture = (
            RouteCapture(len(a.moe_layers), a.top_k, a.num_experts, self.config.max_batch_tokens, self.config.kv_slots, self.device)
            if self.config.return_routed_experts
            else None
        )
        prefix_cache = PrefixCache() if self.config.enable_prefix_cache else None
        self.scheduler = Scheduler(self.slots, self.table, prefix_cache, self.config.max_batch_tokens, self._snapshot_routes)
        # next-token ids by request-table row: step N writes them, step N+1 reads them, all on the device
        self.future_tokens = torch.zeros(self.config.max_running_requests + 1, dtype=torch.int64, device=self.device)
        self.graphs = self._make_graphs()
        self._requests: dict[int, Request] = {}
        self._next_rid = 0
        self._aborting: set[int] = set()
        self._undelivered: list[tuple[int, Rollout]] = []  # finished while generate() waited for others
        self._in_flight: _Launched | None = None
        self._closed = False
        self._seed_rng = random.Random()
        self._torch_attention = "torch" in (self.config.attention_backend, self.config.prefill_attention_backend)
        self._weights = WeightSync()  # weight version, per-request token versions (rollout/engine/weight_update.py)
        self._memory = ColocatedMemory()  # release/resume for a colocated trainer (rollout/engine/colocation.py)

    def _make_graphs(self) -> DecodeGraphs | None:
        if not self.config.cuda_graph:
            return None
        return DecodeGraphs(
            self.model, self.kv, self.table.req_to_slot, self.table.pad_row, self.future_tokens,
            self.capture.record if self.capture is not None else None,
            min(self.config.max_running_requests, self.config.max_batch_tokens),
        )

    # ------------------------------------------------------------------ API
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, start_len: int = 0) -> int:
        """Validate and queue one request; a bad one raises here and never touches the batch."""
        return self._enqueue(*self._validated(prompt_ids, sampling, start_len))

    def _validated(self, prompt_ids: object, sampling: object, start_len: object) -> tuple[list[int], SamplingParams, int]:
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sampling = dataclasses.replace(sampling)  # re-runs its checks: a field set around them is refused here
        if isinstance(start_len, bool) or not isinstance(start_len, int) or not 0 <= start_len <= len(prompt):
            raise ValueError(f"start_len must be an integer in [0, len(prompt)={len(prompt)}], got {start_len!r}")
        return prompt, sampling, start_len

    def _enqueue(self, prompt: list[int], sampling: SamplingParams, start_len: int) -> int:
        rid = self._next_rid
        self._next_rid += 1
        seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(63)
        budget = min(sampling.max_new_tokens, self.max_context - len(prompt))
        req = Request(rid=rid, prompt_ids=prompt, sampling=sampling, start_len=start_len, seed=seed, output_budget=budget)
        self._requests[rid] = req
        self._weights.start(rid)
        self.scheduler.add(req)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def progress(self, rid: int) -> tuple[list[int], list[float]] | None:
        """Output tokens and logprobs of an unfinished request so far (copies), for streaming; None once it left."""
        r = self._requests.get(rid)
        return None if r is None else (list(r.output_ids), list(r.output_logprobs))

    def abort(self, rid: int) -> None:
        """Stop ``rid``; it comes back from a later ``step()`` with finish_reason "abort"."""
        if rid not in self._requests:
            raise ValueError(f"no unfinished request with id {rid}")
        self._requests[rid].abort_requested = True
        self._aborting.add(rid)

    def take_finished(self) -> list[tuple[int, Rollout]]:
        """Requests that finished outside ``step()`` (drained by ``update_weights``), handed out once."""
        finished, self._undelivered = self._undelivered, []
        return finished

    def step(self) -> list[tuple[int, Rollout]]:
        """One loop iteration; returns the requests that finished in it."""
        finished = self.take_finished()
        finished += self._finish_aborted()  # before scheduling: an aborted request still waiting costs nothing
        batch = self.scheduler.schedule(can_preempt=self._in_flight is None)
        if batch is BLOCKED:  # preemption snapshots routes, so every step must be finalized first
            finished += self._drain()
            batch = self.scheduler.schedule(can_preempt=True)
        launched = self._launch_or_fail(batch) if isinstance(batch, Batch) else None
        if self._in_flight is not None:
            finished += self._process(self._in_flight)  # overlaps with `launched` on the device
        self._in_flight = launched
        if not self.config.overlap:
            finished += self._drain()
        return finished + self._finish_aborted()

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams], start_len: int | list[int] = 0
    ) -> list[Rollout]:
        """Run ``prompts`` to completion (with whatever else is queued); results in prompt order.

        Every request (prompt, sampling, start_len) is validated before any is queued,
        so one bad request raises without leaving half a batch behind.
        """
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling] * n
        starts = start_len if isinstance(start_len, list) else [start_len] * n
        if len(samplings) != n or len(starts) != n:
            raise ValueError(f"got {n} prompts but {len(samplings)} sampling params and {len(starts)} start_len values")
        checked = []
        for i, request in enumerate(zip(prompts, samplings, starts)):
            try:
                checked.append(self._validated(*request))
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        rids = [self._enqueue(*request) for request in checked]
        wanted, done, others = set(rids), {}, []
        try:
            while wanted - done.keys():
                if not self.scheduler.has_work() and self._in_flight is None:
                    raise RuntimeError(f"engine went idle with requests {sorted(wanted - done.keys())} unfinished")
                for rid, rollout in self.step():
                    if rid in wanted:
                        done[rid] = rollout
                    else:
                        others.append((rid, rollout))
        except BaseException:  # the engine itself broke (or an interrupt): drop this call's requests
            for rid in wanted - done.keys():
                self._discard(rid)
            raise
        finally:
            self._undelivered += others  # requests added with add_request come back from the next step()
        return [done[rid] for rid in rids]

    def close(self) -> None:
        """Finish the step in flight and free device memory now; unfinished requests are dropped.

        The scheduler's callback into the engine is a reference cycle, so without this the
        weights and KV pool would wait for the cyclic garbage collector (two engines at once on a GPU).
        """
        if self._closed:
            return
        self._drain()
        self._closed = True
        self._requests.clear()
        self.graphs = self.model = self.kv = self.table = self.capture = self.scheduler = None  # type: ignore[assignment]
        self.future_tokens = None  # type: ignore[assignment]

    @property
    def stats(self) -> dict[str, int]:
        s = self.scheduler
        return {
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "computed_tokens": s.computed_tokens,
            "preemptions": s.num_preemptions,
            "cached_tokens": s.prefix_cache.num_cached if s.prefix_cache is not None else 0,
            "free_slots": self.slots.num_free,
        }

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """fp32 logits ``[T, V]`` of every prompt position, for checks against a reference forward."""
        prompt = self._check_prompt(prompt_ids)
        self._drain()
        n = len(prompt)
        slots, row = self.slots.alloc(n), self.table.alloc()
        idx = np.arange(n, dtype=np.int64)
        plan = Batch(
            requests=[], rows=np.asarray([row], np.int64), extend_lens=[n], samples=[False],
            input_ids=np.asarray(prompt, np.int64), positions=idx, out_cache_loc=np.asarray(slots, np.int64),
            table_rows=np.full(n, row, np.int64), table_cols=idx, table_slots=np.asarray(slots, np.int64),
        )
        try:
            dev = batch_mod.build(plan, self.table.req_to_slot, self.device)
            hidden = self.model.forward(dev.input_ids, dev.positions, dev.out_cache_loc, dev.meta, self.kv.k, self.kv.v, None)
            return self.model.logits(hidden).float().cpu()
        finally:
            self.slots.free(slots)
            self.table.free(row)

    # ------------------------------------------------------------ RL verbs
    @property
    def weight_version(self) -> Version:
        """The version of the weights now in the engine (0 until the first ``update_weights``)."""
        return self._weights.version

    def update_weights(self, weights: object, version: Version, *, in_flight: str = "finish") -> None:
        """Copy ``weights`` (transformers names -> tensors; a mapping or ``(name, tensor)`` pairs, any
        subset) into the engine in place, then flush every cache the old weights filled.

        Everything is checked before anything is written: a bad name, shape, dtype or value
        raises ``ValueError`` and the engine is unchanged. ``in_flight`` says what happens to
        unfinished requests: ``"finish"`` them on the old weights first (default), ``"abort"``
        them, or ``"continue"`` them on the new weights with per-token versions
        (``rollout/engine/weight_update.py``). Works while the memory is released.
        """
        self._weights.update(self, weights, version, in_flight)

    def flush_cache(self) -> None:
        """Forget every cached prefix (KV and routes); refused while requests hold KV."""
        if self._closed:
            raise ValueError("the engine is closed")
        self._memory.check_resident()
        self._undelivered += self._drain()
        flush_caches(self)

    def release_memory(self, weights: bool = False) -> None:
        """Free the KV pool (and with ``weights=True`` move the weights to pinned host memory) for a colocated
        trainer; needs an idle engine. ``resume_memory()`` brings everything back (``rollout/engine/colocation.py``)."""
        self._memory.release(self, weights)

    def resume_memory(self) -> None:
        self._memory.resume(self)

    # ------------------------------------------------------------- the step
    def _launch_or_fail(self, batch: Batch) -> _Launched | None:
        """``_launch``; if it raises, no request of the batch can be blamed alone, so each fails with the error."""
        try:
            return self._launch(batch)
        except Exception as exc:
            for r, sampled in zip(batch.requests, batch.samples):
                r.inflight_steps -= 1  # this step never ran: undo what planning it counted
                r.inflight_samples -= int(sampled)
                self._fail(r, exc)
            return None

    @torch.inference_mode()
    def _launch(self, batch: Batch) -> _Launched:
        sampling = batch_mod.build_sampling(batch, self.device, self.model.arch.vocab_size)
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(batch)  # every decode row samples, in batch order
        else:
            dev = batch_mod.build(batch, self.table.req_to_slot, self.device, self._torch_attention)
            ids = torch.where(dev.input_ids < 0, self.future_tokens[(-dev.input_ids - 1).clamp(min=0)], dev.input_ids)
            record = self.capture.record if self.capture is not None else None
            hidden = self.model.forward(ids, dev.positions, dev.out_cache_loc, dev.meta, self.kv.k, self.kv.v, record)
            logits = self.model.logits(hidden[sampling.index]) if sampling is not None else None
        next_ids = logprobs = None
        if sampling is not None:
            tokens, lps = sample(logits, sampling.params, one_pass=self.config.layer_kernels == "triton")
            self.future_tokens[sampling.rows] = tokens
            next_ids, logprobs = _copy_to_host(tokens), _copy_to_host(lps)
        routes = self.capture.copy_to_cpu(batch.out_cache_loc) if self.capture is not None else None
        copy_done = None
        if self.device.type == "cuda":
            copy_done = torch.cuda.Event()
            copy_done.record()
        return _Launched(batch, next_ids, logprobs, routes, copy_done)

    def _process(self, launched: _Launched) -> list[tuple[int, Rollout]]:
        batch = launched.batch
        if self.capture is not None:
            self._copy_routes_while_running(batch.requests, launched.copy_done)
        if launched.copy_done is not None:
            launched.copy_done.synchronize()
        done_before = np.asarray([r.finish_reason is not None for r in batch.requests], dtype=bool)
        if launched.routes is not None:
            keep = np.repeat(~done_before, batch.extend_lens) if done_before.any() else None
            launched.routes.finalize(self.capture.host_cache, keep)
            chunk_ends = (batch.positions[np.cumsum(batch.extend_lens) - 1] + 1).tolist()
            for r, end in zip(batch.requests, chunk_ends):
                r.routes_final = end
        tokens = launched.next_ids.tolist() if launched.next_ids is not None else []
        lps = launched.logprobs.tolist() if launched.logprobs is not None else []
        finished, j = [], 0
        for r, sampled, stale in zip(batch.requests, batch.samples, done_before):
            r.inflight_steps -= 1
            if not sampled:
                continue
            tok, lp = tokens[j], lps[j]
            j += 1
            r.inflight_samples -= 1
            if stale:  # overlap ran one step past this request's stop token: drop that token
                continue
            try:
                r.output_ids.append(tok)
                r.output_logprobs.append(lp)
                if tok in r.sampling.stop_token_ids:
                    finished.append(self._finish(r, FINISH_STOP))
                elif len(r.output_ids) >= r.output_budget:
                    finished.append(self._finish(r, FINISH_LENGTH))
            except Exception as exc:  # this request's fault: it alone fails, the batch goes on
                self._fail(r, exc)
        return finished

    def _drain(self) -> list[tuple[int, Rollout]]:
        launched, self._in_flight = self._in_flight, None
        return self._process(launched) if launched is not None else []

    # ------------------------------------------------------ finish & routes
    def _finish(self, r: Request, reason: str) -> tuple[int, Rollout]:
        routes = self._routes_of(r) if self.capture is not None and r.error is None else None
        self.scheduler.finish(r, reason)
        del self._requests[r.rid]
        version, token_versions = self._weights.finish(r.rid, len(r.output_ids))
        meta = {"prefix_hit_tokens": r.prefix_hit_tokens, "preemptions": r.num_preemptions, "seed": r.seed}
        if r.error is not None:
            meta[ERROR_META_KEY] = r.error
        rollout = Rollout(
            prompt_ids=list(r.prompt_ids), output_ids=list(r.output_ids), output_logprobs=list(r.output_logprobs),
            finish_reason=reason, routed_experts=routes, meta=meta,
            weight_version=version, output_weight_versions=token_versions,
        )
        return r.rid, rollout

    def _finish_aborted(self) -> list[tuple[int, Rollout]]:
        """Aborted requests leave once none of their steps is in flight (their routes are then final)."""
        out = []
        for rid in list(self._aborting):
            r = self._requests.get(rid)
            if r is None:  # it finished on its own first
                self._aborting.discard(rid)
            elif r.inflight_steps == 0:
                self._aborting.discard(rid)
                try:
                    out.append(self._finish(r, FINISH_ABORT))
                except Exception as exc:  # its routes could not be gathered: it leaves failed, without them
                    self._fail(r, exc)
                    out.append(self._finish(r, FINISH_ABORT))
        return out

    def _fail(self, r: Request, exc: BaseException) -> None:
        """Fail ``r`` alone: it leaves like an abort (once none of its steps is in flight), the error in its meta."""
        if r.error is None:
            r.error = f"request failed in the engine: {type(exc).__name__}: {exc}"
        r.abort_requested = True
        self._aborting.add(r.rid)

    def _discard(self, rid: int) -> None:
        """Drop an unfinished request now, with nothing returned (``generate`` is raising)."""
        r = self._requests.pop(rid, None)
        self._aborting.discard(rid)
        if r is not None:
            r.error = r.error or "dropped: generate() raised"
            self.scheduler.finish(r, FINISH_ABORT)
            self._weights.forget(rid)

    def _copy_routes(self, r: Request, upto: int) -> None:
        """Copy ``r``'s routes of positions ``[routes_copied, upto)`` from the host cache into its own array.

        Rows copied once are kept: after a preemption they are the routes the sampled tokens were
        made with, whatever a recompute would route.
        """
        if r.routes is None:  # room for every position the request can reach; untouched pages cost nothing
            shape = self.capture.host_cache.shape
            r.routes = np.empty((len(r.prompt_ids) + r.output_budget,) + shape[1:], dtype=self.capture.host_dtype)
        if upto > r.routes_copied:
            self.capture.gather(r.slots[r.routes_copied : upto], r.routes[r.routes_copied : upto])
            r.routes_copied = upto

    def _copy_routes_while_running(self, requests: list[Request], copy_done: torch.cuda.Event | None) -> None:
        """While the device runs the step being processed, copy the final rows of its requests' routes.

        Without it every request's routes are gathered when it finishes, and an RL batch finishes
        in one step with nothing on the device to hide that under: 302 MB at 512 x 1.5K tokens,
        0.03-0.29 s of a 10.6 s batch on the H200. Here the host's idle wait does it, ``ROUTE_COPY_ROWS``
        rows or more a request at a time, and stops once the step is done (on CPU there is no wait
        to fill: everything due is copied).
        """
        for r in requests:
            if r.finish_reason is None and r.routes_final - r.routes_copied >= ROUTE_COPY_ROWS:
                if copy_done is not None and copy_done.query():
                    return
                self._copy_routes(r, r.routes_final)

    def _route_rows(self, r: Request, n: int) -> np.ndarray:
        """Routes of positions ``[0, n)``: the request's copied rows, the rest from the host cache by slot."""
        self._copy_routes(r, min(n, len(r.slots)))
        rows = r.routes[:n]
        rows[r.routes_copied :] = np.iinfo(rows.dtype).max  # positions never fed (an abort): no route
        return rows

    def _snapshot_routes(self, r: Request) -> None:
        """Before a preemption frees ``r``'s slots: the routes the sampled tokens were made with."""
        if self.capture is not None:
            self._copy_routes(r, len(r.slots))

    def _routes_of(self, r: Request) -> RoutedExperts:
        """Rows for positions ``[start_len, seq_len - 1)``: the last sampled token never went through the model."""
        rows = self._route_rows(r, r.num_known - 1)
        # rows come from the device top-k in the compact dtype: distinct, in range, no partial rows
        return RoutedExperts(rows[r.start_len :], self.spec.num_experts, self.spec.moe_layers, r.start_len, validate=False)

    def _check_prompt(self, prompt_ids: object) -> list[int]:
        if self._closed:
            raise ValueError("the engine is closed")
        self._memory.check_resident()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt must be a non-empty list of token ids")
        vocab = self.model.arch.vocab_size
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_context} tokens "
                "(it needs room for at least one new token)"
            )
        return [int(t) for t in prompt_ids]


def _copy_to_host(t: torch.Tensor) -> torch.Tensor:
    """Non-blocking D2H into pinned memory (a plain copy on CPU); read it after copy_done."""
    if t.device.type != "cuda":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
