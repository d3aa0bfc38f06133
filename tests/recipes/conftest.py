"""Shared fixtures: the ``r3`` command line in a subprocess (as a user runs it) and one small end-to-end run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# A smaller setting than recipes/tiny-moe.yaml, same model and dtypes: the end-to-end acceptance run.
SMALL_RECIPE = {
    "model": {"name": "tiny-qwen3-moe", "init": "unit-scale", "seed": 0},
    "rollout": {"dtype": "bfloat16", "overlap": True, "num_prompts": 8, "max_running_requests": 8,
                "max_batch_tokens": 512, "kv_slots": 1024, "prompts": {"length": 16},
                "sampling": {"max_new_tokens": 16, "seed": 0}},
    "trainer": {"dtype": "float32", "micro_batch_size": 4, "replay": "r3"},
}


def r3_env() -> dict[str, str]:
    # This checkout first on the path, whatever the cwd and however the package was installed.
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _r3(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes.cli", *args], cwd=cwd, env=r3_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_r3() -> Callable[..., subprocess.CompletedProcess]:
    return _r3


@pytest.fixture(scope="session")
def r3_popen() -> Callable[..., subprocess.Popen]:
    def popen(*args: str, cwd: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "recipes.cli", *args], cwd=cwd, env=r3_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return popen


@pytest.fixture
def small_recipe() -> dict[str, Any]:
    return copy.deepcopy(SMALL_RECIPE)


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> dict[str, Any]:
    """``r3 run`` once on SMALL_RECIPE from an empty directory (so it also makes the demo model)."""
    cwd = tmp_path_factory.mktemp("small_run")
    write_recipe(cwd / "small.yaml", SMALL_RECIPE)
    proc = _r3("run", "small.yaml", "--out", "out", "--no-progress", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "out"
    return {"cwd": cwd, "out": out, "proc": proc, "report": json.loads((out / "report.json").read_text()),
            "model": cwd / "models" / "tiny-qwen3-moe-seed0-unit-scale"}
