"""The GRPO math of ``r3 train``: group-normalised advantages and the clipped policy-gradient loss.

Both follow verl's ``core_algos`` (``compute_grpo_outcome_advantage`` and the "vanilla"
policy loss: PPO clipping plus the dual clip for negative advantages, token-mean
aggregation); ``tests/recipes/test_grpo.py`` checks them against verl on the same inputs.
The behaviour policy is the *rollout engine's* logprobs, so the importance ratio carries
the rollout/trainer mismatch that routing replay exists to remove.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-6  # verl's epsilon in the std normalisation
LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to [-20, 20] before exp


def group_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(score - group mean) / (group std + eps)`` for groups of ``group_size`` consecutive scores.

    The std is the unbiased one (``torch.std``), as in verl and the GRPO paper; a group whose
    completions all scored the same gets advantage 0 for each of them.
    """
    if scores.ndim != 1 or group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"need a 1-D score tensor of whole groups of >= 2, got {list(scores.shape)}, group {group_size}")
    groups = scores.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).view(-1)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar: token-sum of the clipped losses / num_tokens
    clipped_tokens: torch.Tensor  # tokens where the clip (not the ratio) set the loss
    tokens: torch.Tensor  # tokens in the mask


def clipped_policy_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    clip_ratio_c: float,
    num_tokens: int | torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate with dual clip, summed over ``mask`` and divided by ``num_tokens``.

    ``logp``, ``behaviour_logp``, ``advantages`` and ``mask`` are ``[batch, response]``.
    ``num_tokens`` defaults to the mask's count; pass the mini-batch's count when this is one
    micro-batch of it, so the accumulated gradients are the mini-batch token mean.
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask = mask.to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - behaviour_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    surrogate = torch.maximum(unclipped, clipped)
    dual = torch.minimum(-advantages * clip_ratio_c, surrogate)
    losses = torch.where(advantages < 0, dual, surrogate)
    tokens = mask.sum()
    denominator = tokens if num_tokens is None else num_tokens
    return PolicyLoss(
        loss=(losses * mask).sum() / denominator,
        clipped_tokens=((clipped > unclipped).to(mask.dtype) * mask).sum(),
        tokens=tokens,
    )
