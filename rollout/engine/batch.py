"""A host ``Batch`` plan turned into device tensors with one non-blocking copy.

Everything a step needs (ids, positions, slots, padding maps, request-table
writes, sampling rows) is packed on the host into one int64 and one float32
buffer, pinned, and copied asynchronously; nothing here reads a device tensor,
so building step N+1 never waits for step N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rollout.engine.models.layers import AttentionMetadata
from rollout.engine.sampler import SamplingTensors
from rollout.engine.scheduler import Batch

VIEW_ALIGN_BYTES = 16  # the pointer alignment Triton specialises on


def to_device(arrays: list[np.ndarray], dtype: np.dtype, device: torch.device) -> list[torch.Tensor]:
    """Copy several host arrays in one (pinned, non-blocking) transfer; returns device views.

    Every view starts on a ``VIEW_ALIGN_BYTES`` boundary. Triton compiles a kernel per pointer
    alignment it meets (16 bytes or not), so unaligned views compiled new kernels in the middle of
    serving: on the H200 a prefill of 65 sequences (an odd count of int64s before the next array) spent
    0.45 s instead of 0.03 s in each of its first two steps (docs/benchmarks.md, issue 15).
    """
    arrays = [np.asarray(a) for a in arrays]
    step = max(1, VIEW_ALIGN_BYTES // np.dtype(dtype).itemsize)  # elements per aligned unit
    starts, total = [], 0
    for a in arrays:
        starts.append(total)
        total += -(-a.size // step) * step
    flat = np.zeros(total, dtype)
    for a, start in zip(arrays, starts):
        flat[start : start + a.size] = a.reshape(-1)
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    return [dev[start : start + a.size].view(a.shape) for a, start in zip(arrays, starts)]


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # [N], negative = placeholder for a token still in flight
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    meta: AttentionMetadata


@dataclass
class DeviceSampling:
    index: torch.Tensor  # [S] flat token index of each sampling chunk's last token
    rows: torch.Tensor  # [S] request-table rows (index of the future-token buffer)
    params: SamplingTensors


def build(batch: Batch, req_to_slot: torch.Tensor, device: torch.device, torch_metadata: bool = True) -> DeviceBatch:
    """Forward inputs and attention metadata; also writes this step's request-table entries.

    ``torch_metadata=False`` skips what only the torch attention path reads (the padding maps,
    the gathered ``[B, max_kv]`` slots and the ``[B, max_q, max_kv]`` mask): the paged kernels
    read the request table in place.
    """
    ext = np.asarray(batch.extend_lens, dtype=np.int64)
    n, b, max_q = int(ext.sum()), len(ext), int(ext.max())
    starts = np.concatenate([[0], np.cumsum(ext)])  # [B + 1]
    kv_lens = batch.positions[starts[1:] - 1] + 1
    ints = [batch.input_ids, batch.positions, batch.out_cache_loc, batch.table_rows, batch.table_cols,
            batch.table_slots, batch.rows, kv_lens, starts]
    if torch_metadata:
        q_slot = np.arange(max_q)[None, :]
        valid = q_slot < ext[:, None]
        pad_index = np.where(valid, starts[:-1, None] + q_slot, n)
        q_pos = np.where(valid, batch.positions[np.minimum(pad_index, n - 1)], 0)
        unpad_index = (np.arange(b)[:, None] * max_q + q_slot)[valid]
        ints += [pad_index, q_pos, unpad_index]
    input_ids, positions, loc, t_rows, t_cols, t_slots, rows_t, kv_lens_t, starts_t, *padding = to_device(
        ints, np.int64, device
    )
    # the request table must hold this step's slots before attention gathers through it
    req_to_slot[t_rows, t_cols] = t_slots
    kv_slots = mask = pad_t = unpad_t = None
    if torch_metadata:
        pad_t, q_pos_t, unpad_t = padding
        max_kv = int(kv_lens.max())
        kv_slots = req_to_slot[rows_t, :max_kv]
        mask = (torch.arange(max_kv, device=device)[None, None, :] <= q_pos_t[:, :, None])[:, None]
    meta = AttentionMetadata(
        kv_slots=kv_slots, mask=mask, pad_index=pad_t, unpad_index=unpad_t, seq_rows=rows_t, kv_lens=kv_lens_t,
        req_to_slot=req_to_slot, decode=max_q == 1, q_starts=starts_t, max_q=max_q,
    )
    return DeviceBatch(input_ids=input_ids, positions=positions, out_cache_loc=loc, meta=meta)


def build_sampling(batch: Batch, device: torch.device, vocab_size: int) -> DeviceSampling | None:
    """Per-row sampling parameters of the chunks that sample; None if none does."""
    sampled = np.asarray(batch.samples, dtype=bool)
    if not sampled.any():
        return None
    ext = np.asarray(batch.extend_lens, dtype=np.int64)
    index = (np.cumsum(ext) - 1)[sampled]
    reqs = [r for r, s in zip(batch.requests, batch.samples) if s]
    seeds = [r.seed for r in reqs]
    top_k = [r.sampling.top_k if r.sampling.top_k > 0 else vocab_size for r in reqs]
    index_t, rows_t, seeds_t, pos_t, top_k_t = to_device(
        [index, batch.rows[sampled], seeds, batch.positions[index] + 1, top_k], np.int64, device
    )
    temps = [float(r.sampling.temperature) for r in reqs]
    # top_p = 1 must keep every token: a cumulative sum can round past 1 before the tail
    top_ps = [float(r.sampling.top_p) if r.sampling.top_p < 1 else 2.0 for r in reqs]
    temp_t, top_p_t = to_device([temps, top_ps], np.float32, device)
    params = SamplingTensors(
        temperature=temp_t, top_p=top_p_t, top_k=top_k_t, seeds=seeds_t, positions=pos_t,
        needs_truncation=any(r.sampling.top_k > 0 or r.sampling.top_p < 1 for r in reqs if not r.sampling.greedy),
        all_greedy=all(r.sampling.greedy for r in reqs),
    )
    return DeviceSampling(index=index_t, rows=rows_t, params=params)
