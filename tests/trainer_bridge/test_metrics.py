"""Consistency metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer_bridge import metrics


def test_routing_agreement_compares_sets_per_layer_and_skips_missing_rows():
    a = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [-1, -1]]])  # [T=3, L=2, K=2]
    b = torch.tensor([[[1, 0], [2, 4]], [[4, 5], [7, 6]], [[0, 3], [1, 2]]])
    assert metrics.routing_agreement(a, b).tolist() == pytest.approx([2 / 3, 1 / 2])
    mask = torch.tensor([True, False, True])
    assert metrics.routing_agreement(a, b, mask).tolist() == pytest.approx([1 / 2, 0.0])
    only_missing = metrics.routing_agreement(a[2:], b[2:])
    assert only_missing[0] == 0 and math.isnan(only_missing[1])
    assert metrics.routing_agreement(a.numpy(), b.numpy()).tolist() == pytest.approx([2 / 3, 1 / 2])
    with pytest.raises(ValueError, match="shape"):
        metrics.routing_agreement(a, b[:2])
    with pytest.raises(ValueError, match="mask shape"):
        metrics.routing_agreement(a, b, mask[:2])


def test_logprob_mismatch():
    rollout = np.log(np.array([0.5, 0.2, 0.9, 0.1]))
    trainer = np.log(np.array([0.5, 0.5, 0.3, 0.1]))
    out = metrics.logprob_mismatch(rollout, trainer, mask=np.array([1, 1, 1, 0]))
    r = rollout[:3] - trainer[:3]
    assert out["tokens"] == 3
    assert out["mean_abs"] == pytest.approx(np.abs(r).mean())
    assert out["max_abs"] == pytest.approx(math.log(3))
    assert out["k3_kl"] == pytest.approx(np.mean(np.exp(r) - 1 - r))
    # ratios p_trainer / p_rollout: 1, 2.5, 1/3 -> two outside [0.5, 2]
    assert out["ratio_outside"] == pytest.approx(2 / 3)
    same = metrics.logprob_mismatch(torch.tensor(rollout), torch.tensor(rollout))
    assert same["mean_abs"] == same["k3_kl"] == same["ratio_outside"] == 0.0
    with pytest.raises(ValueError, match="no token"):
        metrics.logprob_mismatch(rollout, trainer, mask=np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        metrics.logprob_mismatch(rollout, trainer[:2])


def test_token_logprobs_scores_the_next_token():
    logits = torch.log(torch.tensor([[[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]]]))
    ids = torch.tensor([[0, 1, 0]])
    assert metrics.token_logprobs(logits, ids).exp()[0].tolist() == pytest.approx([0.3, 0.1])
