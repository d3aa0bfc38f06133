"""Routed-experts capture that never stalls the overlap loop.

Flow of one step (SGLang PR #22911's design, with a compact host cache):

1. each MoE layer slice-assigns its top-k ids into ``device_buffer[:N, layer]``
   (no host sync; a fixed buffer a CUDA graph can capture);
2. ``copy_to_cpu(out_cache_loc)`` issues a non-blocking device->host copy into a
   pinned staging buffer *on the forward stream, before the step's copy_done event*;
3. after ``copy_done.synchronize()`` the loop calls ``RoutedExpertsOutput.finalize``,
   which writes ``host_cache[out_cache_loc] = ids``.

The host cache is indexed by KV slot, so tokens served from the prefix cache keep the
routes of the step that computed them. It stores ids in the compact dtype (uint8 for
<= 255 experts): SGLang keeps int32, 4x the memory. Two staging buffers alternate
because step N+1's copy is issued before step N is finalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rollout.routed_experts import compact_dtype, sentinel_for

# Device dtype of the capture buffer: narrow for a cheap D2H copy, wide enough for the ids.
_DEVICE_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype("<u2"): torch.int16}


@dataclass
class RoutedExpertsOutput:
    """One step's routes in flight: a staging view and the slots its rows belong to."""

    out_cache_loc: np.ndarray  # [N] host, known when the step was planned
    staged: torch.Tensor  # [N, L, K] host (pinned on CUDA), filled by the async copy

    def finalize(self, host_cache: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Call only after the step's copy_done event: the staged bytes are then complete.

        ``keep`` drops rows of requests that finished before this step (the extra token
        overlap computes past a stop token): their routes must not land anywhere.
        """
        ids = self.staged.numpy().view(host_cache.dtype)
        if keep is None:
            host_cache[self.out_cache_loc] = ids
        else:
            host_cache[self.out_cache_loc[keep]] = ids[keep]


class RouteCapture:
    def __init__(
        self, num_moe_layers: int, top_k: int, num_experts: int, max_batch_tokens: int, num_slots: int, device: torch.device
    ) -> None:
        self.host_dtype = compact_dtype(num_experts)
        torch_dtype = _DEVICE_DTYPES[self.host_dtype]
        shape = (max_batch_tokens, num_moe_layers, top_k)
        self.device_buffer = torch.zeros(shape, dtype=torch_dtype, device=device)
        pin = device.type == "cuda"
        self._staging = [torch.zeros(shape, dtype=torch_dtype, pin_memory=pin) for _ in range(2)]
        self._next_staging = 0
        # one row per KV slot (slot 0 is the padding slot); sentinel = never captured
        self.host_cache = np.full((num_slots + 1, num_moe_layers, top_k), sentinel_for(num_experts), dtype=self.host_dtype)

    def record(self, moe_index: int, top_ids: torch.Tensor) -> None:
        """Called inside the forward by MoE layer ``moe_index`` with its ``[N, K]`` top-k ids."""
        self.device_buffer[: top_ids.shape[0], moe_index] = top_ids

    def copy_to_cpu(self, out_cache_loc: np.ndarray) -> RoutedExpertsOutput:
        """Issue the D2H copy of this step's rows; must run before the step's copy_done event."""
        n = len(out_cache_loc)
        staged = self._staging[self._next_staging][:n]
        self._next_staging ^= 1
        staged.copy_(self.device_buffer[:n], non_blocking=True)
        return RoutedExpertsOutput(out_cache_loc=out_cache_loc, staged=staged)

    def gather(self, slots: list[int] | np.ndarray, out: np.ndarray) -> None:
        """Copy the routes of ``slots`` into ``out[:len(slots)]``.

        Straight into the caller's array: a request's routes are copied once, with no temporary.
        When a whole batch finishes in one step (RL rollouts of equal length), this is hundreds
        of MB that nothing overlaps, so an extra pass and allocation show in routes on/off.
        """
        np.take(self.host_cache, np.asarray(slots, dtype=np.int64), axis=0, out=out[: len(slots)])
