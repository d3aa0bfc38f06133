"""CUDA graphs of the decode forward: one graph per padded batch size, replayed with new inputs.

A decode step launches hundreds of small kernels; replaying a captured graph costs
one launch. A graph covers ids -> layers -> logits for a batch where every request
feeds exactly one token and gains exactly one request-table entry; everything else
(prefill, the first step after a prefix hit) runs eagerly. Sampling stays eager: its
host-known switches (greedy, truncation) would multiply the graphs, and it is cheap.

Inputs live in static buffers that every graph reads; padding rows feed token 0 at
position 0 into ``PAD_SLOT`` through the table's reserved ``pad_row``, so they never
touch a real request's KV or routes. Captured only when ``EngineConfig.cuda_graph``
is on (CUDA, Triton paged attention, experts that never read back to the host).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from rollout.engine.batch import to_device
from rollout.engine.kvcache import PAD_SLOT, KVPool
from rollout.engine.models.layers import AttentionMetadata
from rollout.engine.models.model import MoEModel
from rollout.engine.scheduler import Batch


# (first size, step) of each run of graph batch sizes: a batch pads by fewer than max(8, batch / 16) rows
# (at most 6% past 128); every power of two is a size, which the fused-MoE config keys rely on
_GRAPH_SIZE_RUNS = ((16, 8), (256, 16), (512, 32), (1024, 64))


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes a decode graph is captured for, up to and including ``max_batch`` (SGLang-like buckets)."""
    sizes = {1, 2, 4, 8, 12}
    for (first, step), nxt in zip(_GRAPH_SIZE_RUNS, [r[0] for r in _GRAPH_SIZE_RUNS[1:]] + [None]):
        sizes.update(range(first, nxt if nxt is not None else max_batch + 1, step))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


def padded_batch_size(batch: int, sizes: list[int]) -> int:
    """The graph a batch of ``batch`` requests replays: the smallest size that holds it."""
    return next(s for s in sizes if s >= batch)


class DecodeGraphs:
    def __init__(
        self,
        model: MoEModel,
        kv: KVPool,
        req_to_slot: torch.Tensor,
        pad_row: int,
        future_tokens: torch.Tensor,
        record: Callable[[int, torch.Tensor], None] | None,
        max_batch: int,
        capture: bool = True,
    ) -> None:
        """``capture=False`` runs the same padded static-buffer forward eagerly (how CPU tests check it)."""
        self._model, self._kv, self._req_to_slot, self._future, self._record = model, kv, req_to_slot, future_tokens, record
        self.sizes = graph_batch_sizes(max_batch)
        self.replays = 0
        device, n = model.device, self.sizes[-1]
        self._pad_row = pad_row
        self._ids = torch.zeros(n, dtype=torch.int64, device=device)
        self._pos = torch.zeros(n, dtype=torch.int64, device=device)
        self._loc = torch.full((n,), PAD_SLOT, dtype=torch.int64, device=device)
        self._rows = torch.full((n,), pad_row, dtype=torch.int64, device=device)
        self._lens = torch.ones(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        if not capture:
            return
        # one logits buffer for every graph: kept per graph, 68 graphs' [bs, V] outputs would hold ~8 GB
        out = torch.empty(n, model.arch.vocab_size, dtype=model.dtype, device=device)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                self._forward(bs, out[:bs])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bs] = self._forward(bs, out[:bs])
            self._graphs[bs] = graph

    @torch.inference_mode()
    def _forward(self, bs: int, out: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids[:bs]
        ids = torch.where(ids < 0, self._future[(-ids - 1).clamp(min=0)], ids)
        rows, pos, loc = self._rows[:bs], self._pos[:bs], self._loc[:bs]
        self._req_to_slot[rows, pos] = loc
        meta = AttentionMetadata(
            kv_slots=None, mask=None, pad_index=None, unpad_index=None, seq_rows=rows, kv_lens=self._lens[:bs],
            req_to_slot=self._req_to_slot, decode=True,
        )
        hidden = self._model.forward(ids, pos, loc, meta, self._kv.k, self._kv.v, self._record)
        return self._model.logits(hidden, out)

    def can_run(self, batch: Batch) -> bool:
        n = len(batch.requests)
        return (
            0 < n <= self.sizes[-1]
            and all(e == 1 for e in batch.extend_lens)
            and all(batch.samples)
            and len(batch.table_rows) == n  # only the new token's entry: no prefix-hit rows to write
        )

    def run(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B, V]`` of a decode batch, rows in batch order."""
        b = len(batch.requests)
        bs = padded_batch_size(b, self.sizes)
        pad = bs - b

        def padded(values: np.ndarray, fill: int) -> np.ndarray:
            return np.concatenate([values, np.full(pad, fill, dtype=np.int64)])

        new = to_device(
            [
                padded(batch.input_ids, 0), padded(batch.positions, 0), padded(batch.out_cache_loc, PAD_SLOT),
                padded(batch.rows, self._pad_row), padded(batch.positions + 1, 1),
            ],
            np.int64, self._model.device,
        )
        for static, values in zip((self._ids, self._pos, self._loc, self._rows, self._lens), new):
            static[:bs].copy_(values, non_blocking=True)
        self.replays += 1
        if not self._graphs:
            return self._forward(bs)[:b]
        self._graphs[bs].replay()
        return self._logits[bs][:b]
