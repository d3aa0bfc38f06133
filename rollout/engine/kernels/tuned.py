"""Where tuned kernel configurations are read from: ``$R3_KERNEL_CONFIG_DIR`` first, then the package's ``configs/``.

``bench/kernels_microbench.py`` measures candidate configurations on a GPU and writes the
winners as small JSON files named after the kernel, the shape and the device; the lead
commits the ones worth keeping into ``configs/``. A kernel with no file for its device runs
its built-in default, so a missing or foreign file only costs speed, never correctness.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR_ENV = "R3_KERNEL_CONFIG_DIR"
PACKAGE_CONFIG_DIR = Path(__file__).with_name("configs")


def config_dirs() -> list[Path]:
    env = os.environ.get(CONFIG_DIR_ENV)
    return ([Path(env)] if env else []) + [PACKAGE_CONFIG_DIR]


def find_config(file_name: str) -> Path | None:
    """The first directory's file of that name, or None."""
    for folder in config_dirs():
        path = folder / file_name
        if path.is_file():
            return path
    return None


def device_tag(device: torch.device) -> str:
    """The device's name as it appears in config file names (``NVIDIA_H200``; ``cpu`` off CUDA): letters, digits, ``_``."""
    name = _device_name(device)
    return "".join(c if c.isalnum() else "_" for c in name)


@lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
