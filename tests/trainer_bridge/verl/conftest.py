"""Run verl on CPU: select this folder's CPU platform before any verl engine module is imported.

verl's FSDP engine reads the device name once, at import; the platform must be
set first, so it is set here, when pytest collects this folder. Without verl,
the tests here that need it skip themselves.
"""

from __future__ import annotations

import os

try:
    from verl.plugin.platform.platform_manager import set_platform
except ImportError:
    set_platform = None

if set_platform is not None:
    from cpu_platform import PlatformCPU

    set_platform(PlatformCPU())
    # The FSDP engine registers for cuda/npu only; verl's override picks it while the platform says CPU.
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
