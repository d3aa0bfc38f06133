"""Engine test fixtures (the root conftest already limits torch to one thread)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3-moe")
