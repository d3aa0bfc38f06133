"""KV pool and request limits sized from device memory, as SGLang's ``mem_fraction_static`` does.

After the weights are on the device, ``mem_fraction_static`` of the device's *total* memory
is the budget for everything static: what is already in use (the weights, other processes)
plus the KV pool. The rest is left for activations, the CUDA graphs' memory pool, the
request table and the sampler's ``[batch, vocab]`` buffers. ``max_running_requests`` then
follows from the pool: a row per ``TOKENS_PER_REQUEST`` slots, clamped to
``[MIN_RUNNING_REQUESTS, MAX_RUNNING_REQUESTS]`` (the top also bounds how many decode
graphs are captured). On CPU the pool keeps its fixed default.
"""

from __future__ import annotations

import dataclasses

import torch

from rollout.engine.config import CPU_KV_SLOTS, DEFAULT_MEM_FRACTION, EngineConfig
from rollout.engine.models.arch import ModelArch

TOKENS_PER_REQUEST = 256  # pool slots per request-table row when max_running_requests is derived
MIN_RUNNING_REQUESTS = 256  # rows are cheap: a small pool still admits this many (preempting when it runs dry)
MAX_RUNNING_REQUESTS = 1024  # decode graphs are captured up to the limit: this bounds their number
MIN_KV_SLOTS = 1024  # a pool smaller than this from the memory budget means the fraction leaves no room
# The host side grows with the pool (the slot free list, the route cache: num_moe_layers * top_k bytes a slot),
# so a derived pool stops at 4M tokens: bench-qwen3-moe on an H200 gets ~4.2M from 0.85 of its memory, and a
# tiny model would otherwise get ~100M slots it can never use. Set kv_slots to go past it.
MAX_KV_SLOTS = 1 << 22


def kv_bytes_per_slot(arch: ModelArch, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * torch.empty((), dtype=dtype).element_size()


def kv_slots_for(budget_bytes: int, arch: ModelArch, dtype: torch.dtype) -> int:
    return max(0, budget_bytes) // kv_bytes_per_slot(arch, dtype)


def derived_max_running(kv_slots: int) -> int:
    return max(MIN_RUNNING_REQUESTS, min(MAX_RUNNING_REQUESTS, kv_slots // TOKENS_PER_REQUEST))


def size_from_memory(config: EngineConfig, arch: ModelArch, dtype: torch.dtype) -> EngineConfig:
    """``config`` with ``kv_slots`` and ``max_running_requests`` filled in; call once the weights are loaded."""
    kv_slots = config.kv_slots
    device = torch.device(config.device)
    if kv_slots is None and device.type != "cuda":
        kv_slots = CPU_KV_SLOTS
    if kv_slots is None:
        fraction = config.mem_fraction_static if config.mem_fraction_static is not None else DEFAULT_MEM_FRACTION
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # loading leaves freed staging blocks cached: they are not in use
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        kv_slots = min(MAX_KV_SLOTS, kv_slots_for(int(total * fraction) - used, arch, dtype))
        if kv_slots < MIN_KV_SLOTS:
            gib = 1 << 30
            raise ValueError(
                f"mem_fraction_static={fraction} leaves no room for the KV pool: {used / gib:.1f} GiB of "
                f"{total / gib:.1f} GiB are in use after loading the weights (this process and others), and the "
                f"static budget is {total * fraction / gib:.1f} GiB; raise mem_fraction_static or set kv_slots")
    running = config.max_running_requests or derived_max_running(kv_slots)
    return dataclasses.replace(config, kv_slots=kv_slots, max_running_requests=running)
