"""Triton kernels for the built-in engine's CUDA path, each with a torch reference.

- ``paged_decode_attention`` / ``paged_prefill_attention``: attention reading K/V in place from the slot pool;
- ``fused_moe``: the experts as two grouped GEMMs over pairs laid out by expert (SiLU * up fused in);
- ``rms_norm``, ``rope_kv``, ``router_topk``: the per-layer small ops, one kernel each;
- ``gumbel_sample``: the sampler's counter-based Gumbel-max fused into one pass over the logits;
- ``tuned``: where tuned launch configurations are read from.

``bench/kernels_microbench.py`` checks each at the shapes of ``bench-qwen3-moe`` on a GPU, times it
against the torch path it replaces and tunes the launch configurations. Tests run on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``) and natively on CUDA.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the Triton kernels can be used at all (the engine falls back to torch without them)."""
    return importlib.util.find_spec("triton") is not None
