"""A CPU platform for verl, so verl's FSDP engine runs in CPU-only CI.

verl picks its device through ``verl.plugin.platform`` and ships no CPU
platform; without one it falls back to CUDA and fails on the first
``set_device``. A ``PlatformBase`` subclass installed with ``set_platform`` is
verl's extension point for other accelerators, so what runs is verl's own code
path with ``device_name == "cpu"`` and gloo collectives, not a stand-in for it.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Iterator, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase


def _cpu_device_module() -> ModuleType:
    """``torch.cpu`` plus the memory statistics verl logs; CPU memory is not tracked per device, so they read 0."""
    module = ModuleType("r3_cpu_device")
    module.__dict__.update({k: v for k, v in vars(torch.cpu).items() if not k.startswith("__")})
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, lambda device=None: 0)
    module.mem_get_info = lambda device=None: (0, 0)
    module.empty_cache = lambda: None
    module.get_device_name = lambda device=None: "CPU"
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    return module


_DEVICE_MODULE = _cpu_device_module()


class PlatformCPU(PlatformBase):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # never auto-detected: only installed explicitly with set_platform

    def current_device(self) -> Any:
        return "cpu"  # verl passes this to Tensor.to(); an int would mean cuda:N

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
