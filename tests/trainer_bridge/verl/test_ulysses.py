"""Two gloo ranks run verl's FSDP engine: Ulysses sequence parallelism (size 2), then FSDP2 data parallel.

verl's Ulysses attention exchange patches flash-attention only, so on CPU (sdpa)
each rank attends within its own shard and log-probs are not those of the full
sequence. What this checks is what the plugin adds: routes are sharded exactly
like verl shards the tokens (R3), and R2 recordings are gathered back.
"""

from __future__ import annotations

import socket

import pytest

from verl_stack import require

require("verl_harness")

import torch.multiprocessing as mp  # noqa: E402

from rollout.presets import init_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("verl-sp") / "tiny-qwen3-moe"
    init_model("tiny-qwen3-moe", path, seed=0, dtype="float32")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_routes_follow_ulysses_sharding(model_dir):
    """R3: each rank's experts get its slice of the routes. R2: verl returns both ranks' recordings, gathered.
    Then FSDP2 data parallel over the same two ranks: each rank replays its own batch exactly (ulysses_rank.run_data_parallel)."""
    import ulysses_rank

    mp.spawn(ulysses_rank.run, args=(free_port(), model_dir), nprocs=ulysses_rank.SP)
