"""Tiny MoE checkpoints made with the project's presets, loaded in fp32 for exact comparisons."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout.presets import init_model


@pytest.fixture(scope="session")
def load_tiny(tmp_path_factory) -> Callable[..., torch.nn.Module]:
    """``load_tiny(preset, dtype=torch.float32)``: a fresh eval-mode model; each preset is written once per session."""
    root = tmp_path_factory.mktemp("tiny-models")

    def load(preset: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        path = root / preset
        if not path.exists():
            init_model(preset, path, seed=0, dtype="float32")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return load
