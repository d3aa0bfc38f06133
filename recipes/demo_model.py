"""A tiny MoE whose predictions depend on its routing, for the demo run.

Why not the preset as is: tiny presets draw every weight with
``initializer_range=0.02``, a scale meant for hidden sizes in the thousands
(0.02 ~ 1/sqrt(2500)). With ``hidden_size=64`` each layer adds an update ~8x
smaller than a unit-gain layer would, and the LM head's logits spread by ~0.16:
outputs are near-uniform and hardly move whichever experts a token visits.

The demo model is the same preset with *unit-scale* initialisation: every
matrix except the embedding is drawn with std ``1/sqrt(fan_in)`` (the
LeCun/Kaiming scale that trained layers end up near), so attention and every
expert contribute at the scale of the residual stream and logits have unit
spread. Measured with ``r3 run recipes/tiny-moe.yaml`` (bf16 engine, fp32
trainer, 32x32 generated tokens; 2026-12-01, torch 2.13.0, transformers 5.10.4),
native -> R3 replay:

* preset init (``--set model.init=preset``): agreement 99.42% -> 100%,
  mean |dlogp| 0.00093 -> 0.00080 (1.16x), k3 KL 1.06e-6 -> 4.98e-7 (2.1x);
* unit-scale: agreement 97.56% -> 100%, mean |dlogp| 0.0364 -> 0.0096 (3.79x),
  k3 KL 5.89e-3 -> 7.84e-5 (75x).

``r3 init-model --preset NAME --init unit-scale --seed N`` writes the same
checkpoint (same bytes, same fingerprint) as a recipe with ``model.init: unit-scale``.

Training was tried instead: 300 AdamW steps of the 0.02 preset on a synthetic
modular-arithmetic task took minutes on this busy 2-core CPU and left the
effect as small as before (bf16 vs fp32 transformers forwards: mean |dlogp|
0.0094 native vs 0.0091 replayed), so the demo does not train.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

DEMO_SUFFIX = "unit-scale"


def demo_model_dir(models_dir: str | os.PathLike, preset: str, seed: int) -> Path:
    """Where the demo variant of ``preset`` is cached: its name says everything that made its weights."""
    return Path(models_dir) / f"{preset}-seed{seed}-{DEMO_SUFFIX}"


def unit_scale_(model, seed: int) -> None:
    """Redraw every matrix except the embedding with std ``1/sqrt(fan_in)``, in place, from ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))


def make_demo_model(preset: str, out: str | os.PathLike, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write ``preset`` with unit-scale random weights to ``out``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.presets import make_config, save_checkpoint

    config = make_config(preset)
    torch.manual_seed(seed)  # the embedding keeps the preset's init, drawn from the global generator
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    unit_scale_(model, seed)
    model.to(getattr(torch, dtype))
    return save_checkpoint(model, out)


def ensure_demo_model(models_dir: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """The cached demo model, made on first use (an interrupted make leaves nothing behind)."""
    path = demo_model_dir(models_dir, preset, seed)
    if not (path / "config.json").is_file():
        make_demo_model(preset, path, seed)
    return path


def synthetic_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts: the demo model has no task, any ids exercise its routing equally."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(num, length)).tolist()
