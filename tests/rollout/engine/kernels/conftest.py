"""Run the Triton kernels through Triton's interpreter when there is no GPU.

``triton.jit`` decides at decoration time whether a kernel is compiled or
interpreted, so the variable must be set before a kernel module is imported; a
module some earlier test imported (through the engine) is reloaded so that these
tests get interpreted kernels.
"""

import importlib
import os
import sys

import torch

KERNEL_MODULES = ("rollout.engine.kernels.paged_decode_attention", "rollout.engine.kernels.gumbel_sample")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
