"""Shared fixtures (tiny checkpoints made once per session, the recorded SGLang replies) and CI's skip policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from skip_policy import pytest_configure  # noqa: F401  (CI's strict skip policy, on when R3_STRICT_SKIPS is set)

# Tiny models: a second intra-op thread only contends for the two cores CI has.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter. ``triton.jit`` reads this at
# decoration time, so it is set here, before any test module imports a kernel (directly or
# through the engine); a per-directory conftest is too late when another directory's tests
# import the engine first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Recorded from a real SGLang 0.5.17 server (its README says how); part of the repository, so never skipped.
SGLANG_FIXTURE = REPO / "tests" / "fixtures" / "sglang-0.5.17-tiny-qwen3-moe"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(preset, seed=0)`` -> a checkpoint directory, made once per (preset, seed)."""
    from rollout.presets import init_model

    root = tmp_path_factory.mktemp("models")
    made: dict[tuple[str, int], Path] = {}

    def get(preset: str, seed: int = 0) -> Path:
        key = (preset, seed)
        if key not in made:
            made[key] = init_model(preset, root / f"{preset}-{seed}", seed=seed)
        return made[key]

    return get


@pytest.fixture(scope="session")
def sglang_fixture() -> Path:
    """The recorded SGLang checkpoint and replies (read only)."""
    if not (SGLANG_FIXTURE / "replies.json").is_file():
        pytest.fail(f"the recorded SGLang fixture is missing from the checkout: {SGLANG_FIXTURE}")
    return SGLANG_FIXTURE
