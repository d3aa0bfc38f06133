"""Route layouts follow the tokens: padded (verl), remove-padding and position_ids packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_helpers import ExpertInputs
from rollout.moe_spec import MoESpec
from rollout.routed_experts import RoutedExperts
from rollout.types import FINISH_LENGTH, Rollout
from trainer_bridge import pack_batch, pad_batch, replay, sequence_routes, unpad_routes

SPEC = MoESpec("qwen3_moe", num_hidden_layers=3, moe_layers=(0, 1, 2), num_experts=8, top_k=2)


def _rollout(prompt_len: int, output_len: int, seed: int, start: int = 0, layers: int = 3) -> Rollout:
    """Random tokens and random (distinct per row) routes of 2 of 8 experts for positions [start, n - 1)."""
    rng = np.random.default_rng(seed)
    n = prompt_len + output_len
    rows = n - 1 - start
    ids = np.stack([rng.permutation(8)[:2] for _ in range(rows * layers)]).reshape(rows, layers, 2)
    routes = RoutedExperts(ids, 8, tuple(range(layers)), start)
    tokens = rng.integers(0, 512, n).tolist()
    return Rollout(tokens[:prompt_len], tokens[prompt_len:], [0.0] * output_len, FINISH_LENGTH, routes)


def test_padded_layout_puts_each_row_under_its_token():
    rollouts = [_rollout(3, 4, 0), _rollout(5, 2, 1, start=2), _rollout(1, 1, 2)]
    batch = pad_batch(rollouts, SPEC, prompt_length=6, response_length=5, pad_token_id=7)
    assert batch.input_ids.shape == (3, 11) and batch.routes.shape == (3, 11, 3, 2)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), r.num_tokens
        cols = list(range(6 - p, 6)) + list(range(6, 6 + len(r.output_ids)))
        assert batch.input_ids[i, cols].tolist() == r.token_ids
        assert batch.attention_mask[i].sum() == n and batch.attention_mask[i, cols].all()
        assert batch.position_ids[i, cols].tolist() == list(range(n))
        expected = torch.full((n, 3, 2), -1)
        expected[r.routed_experts.start : n - 1] = r.routed_experts.to_torch()
        assert torch.equal(batch.routes[i, cols], expected)  # final token and uncaptured prefix: -1
        pad = batch.attention_mask[i] == 0
        assert (batch.routes[i][pad] == -1).all() and (batch.input_ids[i][pad] == 7).all()


def test_remove_padding_and_packing_flatten_routes_like_tokens():
    rollouts = [_rollout(3, 4, 0), _rollout(5, 2, 1), _rollout(2, 3, 2)]
    padded = pad_batch(rollouts, SPEC)
    unpadded_ids = padded.input_ids[padded.attention_mask.bool()].unsqueeze(0)
    unpadded_routes = unpad_routes(padded.routes, padded.attention_mask)
    packed = pack_batch(rollouts, SPEC)
    assert torch.equal(unpadded_ids, packed.input_ids)
    assert torch.equal(unpadded_routes, packed.routes)
    assert packed.cu_seqlens.tolist() == [0, 7, 14, 19]
    assert packed.position_ids.tolist() == [list(range(7)) + list(range(7)) + list(range(5))]
    for i, r in enumerate(rollouts):
        a, b = packed.cu_seqlens[i], packed.cu_seqlens[i + 1]
        assert torch.equal(packed.routes[0, a:b], sequence_routes(r, SPEC))


def test_rollout_without_routes_routes_natively_and_bad_rollouts_are_refused():
    bare = Rollout([1, 2], [3], [0.0], FINISH_LENGTH)
    assert (sequence_routes(bare, SPEC) == -1).all()
    with pytest.raises(ValueError, match="shorter than the batch"):
        pad_batch([_rollout(3, 4, 0)], SPEC, prompt_length=2)
    wrong = _rollout(3, 4, 0)
    wrong.routed_experts = RoutedExperts(np.zeros((6, 2, 2), dtype=np.int64) + [[0, 1]], 8, (0, 1))
    with pytest.raises(ValueError, match="MoE layers"):
        pad_batch([wrong], SPEC)
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_routes(torch.zeros(2, 5, 3, 2), torch.ones(2, 4))


def test_padded_batch_replays_on_real_tokens(load_tiny):
    """A verl-style padded batch: real tokens get their rollout rows, and match a single-sequence replay."""
    model = load_tiny("tiny-qwen3-moe")
    spec = MoESpec.from_config(model.config)
    rollouts = [_rollout(4, 5, 10, layers=4), _rollout(7, 3, 11, layers=4)]
    batch = pad_batch(rollouts, spec)
    seen = ExpertInputs(model)
    with replay(model, batch.routes, guard="off"), torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    reached = seen.stacked().reshape(batch.routes.shape)
    routed = batch.routes[..., 0] >= 0
    assert torch.equal(reached[routed], batch.routes[routed])
    for i, r in enumerate(rollouts):  # the same sequence alone, routes given as a RoutedExperts
        with replay(model, r.routed_experts, guard="off"), torch.no_grad():
            alone = model(input_ids=torch.tensor([r.token_ids])).logits[0]
        real = batch.attention_mask[i].bool()
        torch.testing.assert_close(logits[i][real], alone, rtol=1e-4, atol=1e-5)
    seen.remove()
