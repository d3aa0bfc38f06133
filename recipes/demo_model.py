"""A tiny MoE whose predictions depend on its routing, for the demo run.

Why not the preset as is: tiny presets draw every weight with
``initializer_range=0.02``, a scale meant for hidden sizes in the thousands
(0.02 ~ 1/sqrt(2500)). With ``hidden_size=64`` each layer then adds a residual
update ~8x smaller than a unit-gain layer would, and the LM head gives logits
with a standard deviation of ~0.16: the output is near-uniform and hardly moves
whichever experts a token visits. Measured on tiny-qwen3-moe, bf16 vs fp32
forwards of the same weights, 32x64 tokens: replaying the bf16 routes in the
fp32 forward moved mean |dlogp| only from 0.0010 to 0.0008.

The demo model is the same preset with *unit-scale* initialisation: every
matrix except the embedding is drawn with std ``1/sqrt(fan_in)`` (the
LeCun/Kaiming scale a trained network's layers end up near), so attention and
every expert contribute at the scale of the residual stream and the LM head's
logits have unit spread. Same measurement: mean |dlogp| 0.037 natively, 0.010
with replay; k3 KL 4.7e-3 vs 8.9e-5. (Training the 0.02 preset for 300 steps on
a synthetic task barely helped: 0.0094 vs 0.0091; and training takes minutes on
a busy 2-core CPU, so the demo does not train.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from rollout.atomic import atomic_dir

DEMO_SUFFIX = "unit-scale"


def demo_model_dir(models_dir: str | os.PathLike, preset: str, seed: int) -> Path:
    """Where the demo variant of ``preset`` is cached: its name says everything that made its weights."""
    return Path(models_dir) / f"{preset}-seed{seed}-{DEMO_SUFFIX}"


def make_demo_model(preset: str, out: str | os.PathLike, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write ``preset`` with unit-scale random weights to ``out``, atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.presets import make_config

    config = make_config(preset)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
    model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = None
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out


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
