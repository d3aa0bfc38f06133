"""Triton kernels for the built-in engine's CUDA path, each with a torch reference.

- ``paged_decode_attention``: decode attention reading K/V in place from the slot pool;
- ``gumbel_sample``: the sampler's counter-based Gumbel-max fused into one pass over the logits.

``bench/kernels_microbench.py`` times each, and the engine's grouped-GEMM experts, against the torch
path it replaces, at the decode shapes of ``bench-qwen3-moe``. Tests run on CPU
through Triton's interpreter (``TRITON_INTERPRET=1``) and natively on CUDA.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the Triton kernels can be used at all (the engine falls back to torch without them)."""
    return importlib.util.find_spec("triton") is not None
