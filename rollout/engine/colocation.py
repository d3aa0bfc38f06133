"""Lend the engine's device memory to a trainer on the same GPU, and take it back.

``release_memory()`` frees the KV pool (and the CUDA graphs, whose captured addresses
point into it); with ``weights=True`` it also moves every weight to pinned host memory.
``resume_memory()`` reallocates the pool, copies the weights back and recaptures the
graphs. In between the engine takes no request (``ValueError``), but
``update_weights`` works: with the weights on the host it writes the host copies, so
the resume uploads the new weights once.

The prefix cache is flushed on release: the KV it points to is gone. Release needs an
idle engine (an RL loop releases between its rollout and its trainer step), so no
request ever loses its KV halfway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rollout.engine.weight_update import flush_caches
from rollout.engine.weights import map_tensors

if TYPE_CHECKING:
    from rollout.engine.engine import Engine


class ColocatedMemory:
    """Whether the engine's memory is lent out, and what it needs to come back."""

    def __init__(self) -> None:
        self.released = False
        self.weights_on_host = False
        self._kv_shape: tuple[int, ...] | None = None
        # pinned host buffers, kept across cycles: pinning gigabytes costs more than the copy itself
        self._host: dict[str, torch.Tensor] = {}

    def check_resident(self) -> None:
        """Refuse work while the memory is lent out (the engine's own checks refuse a closed engine first)."""
        if self.released:
            raise ValueError("the engine's memory is released (release_memory()): call resume_memory() first")

    def release(self, engine: "Engine", weights: bool) -> None:
        if engine._closed:
            raise ValueError("the engine is closed")
        if not isinstance(weights, bool):
            raise ValueError(f"weights must be True or False, got {weights!r}")
        self.check_resident()
        if engine.has_unfinished():
            raise ValueError(
                f"release_memory() with {len(engine._requests)} unfinished requests: finish or abort them first"
            )
        engine._undelivered += engine._drain()
        flush_caches(engine)
        engine.graphs = None
        kv = engine.kv
        self._kv_shape = tuple(kv.k.shape)
        kv.k = kv.v = torch.empty(0, dtype=kv.k.dtype, device=kv.k.device)
        if weights:
            map_tensors(engine.model.weights, lambda key, t: self._host_copy(key, t, pin=engine.device.type == "cuda"))
        self.weights_on_host = weights
        self.released = True
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
            torch.cuda.empty_cache()  # hand the blocks back, so another process (or allocator pool) can use them

    def resume(self, engine: "Engine") -> None:
        if engine._closed:
            raise ValueError("the engine is closed")
        if not self.released:
            raise ValueError("resume_memory() without release_memory(): the engine's memory is in place")
        device = engine.device
        if self.weights_on_host:
            map_tensors(engine.model.weights, lambda key, t: t.to(device, non_blocking=True, copy=True))
        kv, shape = engine.kv, self._kv_shape
        kv.k = torch.zeros(shape, dtype=kv.k.dtype, device=device)
        kv.v = torch.zeros(shape, dtype=kv.v.dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the pinned host copies may be dropped only once uploaded
        engine.graphs = engine._make_graphs()
        self.released = self.weights_on_host = False

    def _host_copy(self, key: str, t: torch.Tensor, pin: bool) -> torch.Tensor:
        host = self._host.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = self._host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        return host.copy_(t)
