"""Engine tests run tiny models: one torch thread is several times faster than two
when the machine's cores are shared (OpenMP threads spin against each other)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3-moe")
