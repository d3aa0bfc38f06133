"""Routes survive preemption: what comes back is the snapshot, not a recompute.

On CPU in fp32 a request recomputed after a preemption gets the same routes it had,
so comparing with a run that never preempts cannot tell a snapshot from a recompute
(with ``Engine._snapshot_routes`` made a no-op, such tests still pass). Here the
engine's router weights change at the moment of the first preemption: every router
row moves to the next expert, copied into the engine's own tensors, so a recompute
routes every token differently. Only the snapshot returns the routes the sampled
tokens were made with.
"""

from __future__ import annotations

import numpy as np
import torch

from rollout.engine.engine import Engine
from rollout.types import SamplingParams

PROMPT_LEN, NEW_TOKENS = 8, 16
# Four requests need 4 x (8 + 16) = 96 slots; 64 admit all of them and run out during decode.
TIGHT_POOL = dict(kv_slots=64, max_batch_tokens=64, enable_prefix_cache=False)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(5)
    prompts = rng.integers(0, 512, size=(4, PROMPT_LEN)).tolist()
    return prompts, [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i) for i in range(4)]


def _roll_routers(engine: Engine) -> None:
    """Expert e now scores what expert e-1 scored: recomputed top-k ids all shift by one."""
    for layer in engine.model.weights.layers:
        if layer.router is not None:
            layer.router.copy_(torch.roll(layer.router, 1, dims=0))


def test_preempted_routes_are_the_snapshot_even_when_a_recompute_would_differ(qwen3_dir):
    prompts, sampling = _workload()
    reference = Engine(qwen3_dir, enable_prefix_cache=False).generate(prompts, sampling)

    engine = Engine(qwen3_dir, **TIGHT_POOL)
    first: dict[int, tuple[int, int]] = {}  # rid -> (positions computed, output tokens) at the first preemption
    snapshot = engine.scheduler._snapshot_routes

    def snapshot_then_change_the_weights(request) -> None:
        snapshot(request)
        if not first:
            first[request.rid] = (len(request.slots), len(request.output_ids))
            _roll_routers(engine)

    engine.scheduler._snapshot_routes = snapshot_then_change_the_weights
    out = engine.generate(prompts, sampling)
    assert first, "the pool was meant to be too small"
    (rid, (computed, sampled)), = first.items()
    assert computed > PROMPT_LEN and sampled > 0, "the first preemption should hit a decoding request"
    got, want = out[rid], reference[rid]
    assert got.meta["preemptions"] >= 1
    # Everything before the preemption was made with the original weights, exactly as in the reference ...
    assert got.output_ids[:sampled] == want.output_ids[:sampled]
    np.testing.assert_array_equal(got.routed_experts.ids[:computed], want.routed_experts.ids[:computed])

    # ... while a recompute of those positions with the changed weights routes them differently.
    recompute = engine.generate([want.token_ids[: computed + 1]], SamplingParams(max_new_tokens=1, temperature=0))[0]
    redone = recompute.routed_experts.ids[:computed]
    assert (redone[:, 0] != want.routed_experts.ids[:computed, 0]).any(-1).all(), "every first-layer route moves"
