"""Rollout/trainer consistency metrics: plain functions over tensors, shared by the main job and the verl plugin.

Two views of the same mismatch: *routing agreement* (did the trainer pick the
experts the rollout engine picked?) and *logprob mismatch* (how far apart are
the two engines' token probabilities?). R3 drives the first to 100% and should
shrink the second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# A token whose trainer/rollout probability ratio leaves [1/RATIO_BOUND, RATIO_BOUND] counts as an outlier.
RATIO_BOUND = 2.0


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def routing_agreement(a: Any, b: Any, mask: Any = None) -> torch.Tensor:
    """Per MoE layer ``[L]``: share of (token, layer) rows whose top-k *sets* are equal.

    ``a``/``b``: ``[*tokens, L, K]`` expert ids, ``-1`` for missing rows (those are left
    out, as are tokens where ``mask`` ``[*tokens]`` is false). A layer with no
    comparable row gives ``nan``.
    """
    a, b = _as_tensor(a).long(), _as_tensor(b).long()
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"route tensors must share a [*tokens, L, K] shape, got {list(a.shape)} and {list(b.shape)}")
    same = (a.sort(-1).values == b.sort(-1).values).all(-1)  # [*tokens, L]
    valid = (a[..., 0] >= 0) & (b[..., 0] >= 0)
    if mask is not None:
        mask = _as_tensor(mask).bool()
        if tuple(mask.shape) != tuple(a.shape[:-2]):
            raise ValueError(f"mask shape {list(mask.shape)} does not match the routes' tokens {list(a.shape[:-2])}")
        valid = valid & mask.unsqueeze(-1)
    flat_same = (same & valid).reshape(-1, a.shape[-2]).sum(0).double()
    flat_valid = valid.reshape(-1, a.shape[-2]).sum(0).double()
    return flat_same / flat_valid


def logprob_mismatch(logp_rollout: Any, logp_trainer: Any, mask: Any = None) -> dict[str, float]:
    """Token logprob mismatch over the tokens where ``mask`` is set.

    With ``r = logp_rollout - logp_trainer``:

    * ``mean_abs`` / ``max_abs``: mean and max of ``|r|``;
    * ``k3_kl``: mean of ``exp(r) - 1 - r``, Schulman's k3 estimator of KL(trainer || rollout):
      unbiased when tokens are drawn from the trainer; on rollout samples (the usual case)
      it is a non-negative, low-variance proxy that agrees with both KL directions to
      second order (both ~ E[r^2] / 2);
    * ``ratio_outside``: share of tokens whose probability ratio ``p_trainer / p_rollout``
      is outside ``[1/2, 2]``.
    """
    lr, lt = _as_tensor(logp_rollout).double(), _as_tensor(logp_trainer).double()
    if lr.shape != lt.shape:
        raise ValueError(f"logprob tensors differ in shape: {list(lr.shape)} vs {list(lt.shape)}")
    keep = torch.ones_like(lr, dtype=torch.bool) if mask is None else _as_tensor(mask).bool()
    if keep.shape != lr.shape:
        raise ValueError(f"mask shape {list(keep.shape)} does not match the logprobs {list(lr.shape)}")
    r = (lr - lt)[keep]
    if r.numel() == 0:
        raise ValueError("logprob_mismatch: the mask selects no token")
    return {
        "mean_abs": float(r.abs().mean()),
        "max_abs": float(r.abs().max()),
        "k3_kl": float((torch.expm1(r) - r).mean()),
        "ratio_outside": float((r.abs() > math.log(RATIO_BOUND)).double().mean()),
        "tokens": int(r.numel()),
    }


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S-1]``: log-probability of each next token (position t scores ``input_ids[:, t+1]``)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
