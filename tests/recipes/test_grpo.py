"""``recipes/grpo.py`` against verl's own ``core_algos`` on the same inputs: advantages and loss are equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.grpo import clipped_policy_loss, group_advantages

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by scripts/test.sh")


def _inputs(seed: int, groups: int = 5, group_size: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    n = groups * group_size
    scores = torch.randint(0, 5, (n,), generator=g).float() / 4  # ties inside groups happen, as with real rewards
    scores[:group_size] = 0.5  # one group where every completion scored the same: advantage 0
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    behaviour = -torch.rand(n, length, generator=g) * 4
    logp = behaviour + torch.randn(n, length, generator=g) * 0.4  # ratios well inside and outside the clip
    return scores, mask, behaviour, logp, group_size


def _verl_advantages(scores, mask, group_size):
    token_rewards = torch.zeros_like(mask)
    last = mask.sum(-1).long() - 1
    token_rewards[torch.arange(len(scores)), last] = scores  # verl's outcome reward sits on the last token
    index = np.repeat(np.arange(len(scores) // group_size), group_size).astype(object)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index)
    return advantages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_equal_verls(seed):
    scores, mask, _, _, group_size = _inputs(seed)
    ours = group_advantages(scores, group_size).unsqueeze(-1) * mask
    theirs = _verl_advantages(scores, mask, group_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert ours[:group_size].abs().max() == 0  # a group that scored the same learns nothing


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip_ratio, clip_ratio_c", [(0.2, 3.0), (0.1, 1.5)])
def test_clipped_policy_loss_equals_verls_vanilla_loss(seed, clip_ratio, clip_ratio_c):
    from verl.workers.config.actor import FSDPActorConfig

    scores, mask, behaviour, logp, group_size = _inputs(seed)
    advantages = _verl_advantages(scores, mask, group_size)
    config = FSDPActorConfig(  # verl's low/high clip default to 0.2 whatever clip_ratio says: set all three
        strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, use_dynamic_bsz=False, rollout_n=1,
        clip_ratio=clip_ratio, clip_ratio_low=clip_ratio, clip_ratio_high=clip_ratio, clip_ratio_c=clip_ratio_c,
    )
    theirs, metrics = core_algos.compute_policy_loss_vanilla(behaviour, logp, advantages, mask, "token-mean", config)
    ours = clipped_policy_loss(logp, behaviour, advantages, mask, clip_ratio, clip_ratio_c)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-7)
    assert float(ours.clipped_tokens / ours.tokens) == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-7)
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # the inputs exercise both sides of the clip

    # micro-batches with the mini-batch's token count add up to the same loss, and the same gradient
    whole = logp.clone().requires_grad_()
    clipped_policy_loss(whole, behaviour, advantages, mask, clip_ratio, clip_ratio_c).loss.backward()
    parts = logp.clone().requires_grad_()
    total = sum(clipped_policy_loss(parts[s], behaviour[s], advantages[s], mask[s], clip_ratio, clip_ratio_c,
                                    num_tokens=mask.sum()).loss for s in (slice(0, 7), slice(7, None)))
    total.backward()
    torch.testing.assert_close(total, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-9)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="whole groups of >= 2"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        clipped_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.2, 1.0)
