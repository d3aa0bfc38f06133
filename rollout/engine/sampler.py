"""On-device sampling whose randomness belongs to the request, not to the batch.

Noise is counter-based: ``u = hash(seed, position, vocab index)`` with integer ops on
the device, then Gumbel-max. A request draws the same noise whether it runs alone,
joins late, shares the batch with others, is preempted and resumed, or runs with
overlap on or off; torch's stateful generators give none of that.

Logprob convention: ``log_softmax(logits / T)`` at the sampled token, with ``T = 1``
for greedy, taken *before* top-p/top-k truncation (the distribution the policy
defines, which is what the trainer recomputes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values < 2**32.

    Products may wrap past 2**63; the low 32 bits, which are all we keep, stay exact.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` floats in (0, 1), a pure function of (seed, position, vocab index)."""
    seed_key = _hash32(_hash32(seeds & _MASK32) ^ (seeds >> 32))
    row_key = _hash32(seed_key ^ _hash32(positions))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row_key[:, None] ^ _hash32(vocab + 0x9E3779B9)[None, :])
    # (2**24 - 1) + 0.5 rounds to 2**24 in fp32: clamp so -log(-log(u)) never becomes +inf
    return (((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=1.0 - 2.0**-24)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, built from host lists each step."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] int64; vocab size when off
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: absolute position of the token being sampled
    needs_truncation: bool  # host-known: skip the vocab sort when no row uses top-p/top-k
    all_greedy: bool


def sample(logits: torch.Tensor, params: SamplingTensors, one_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids ``[B]`` int64 and their logprobs ``[B]`` float32 (see module doc).

    ``one_pass``: on CUDA, rows without top-p/top-k go through one Triton kernel (same function).
    """
    if one_pass and logits.is_cuda and not params.needs_truncation:
        fused = _fused_sampler()
        if fused is not None:  # the same function in one pass over the (bf16) logits
            return fused(logits.contiguous(), params.temperature, params.seeds, params.positions)
    logits = logits.float()
    greedy = params.temperature == 0
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    scaled = logits / temp[:, None]
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    if params.all_greedy:
        ids = torch.argmax(logits, dim=-1)
    else:
        candidates = scaled
        if params.needs_truncation:
            candidates = _truncate(scaled, logprobs_all, params.top_p, params.top_k)
        fused = _fused_gumbel_argmax() if logits.is_cuda else None
        if fused is not None:  # same noise, computed in registers: one pass over [B, V] instead of ~20
            ids = fused(candidates.contiguous(), params.seeds, params.positions, greedy)
        else:
            gumbel = -torch.log(-torch.log(uniform_noise(params.seeds, params.positions, logits.shape[-1])))
            noisy = torch.where(greedy[:, None], candidates, candidates + gumbel)
            ids = torch.argmax(noisy, dim=-1)
    return ids, logprobs_all.gather(-1, ids[:, None]).squeeze(-1)


def _fused_sampler():
    """The Triton kernel of the whole untruncated sampler, or None where Triton is missing."""
    from rollout.engine.kernels import triton_available

    if not triton_available():
        return None
    from rollout.engine.kernels.gumbel_sample import sample_tokens

    return sample_tokens


def _fused_gumbel_argmax():
    """The Triton kernel of this exact noise, or None where Triton is missing."""
    from rollout.engine.kernels import triton_available

    if not triton_available():
        return None
    from rollout.engine.kernels.gumbel_sample import gumbel_argmax

    return gumbel_argmax


def _truncate(scaled: torch.Tensor, logprobs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf (the top token always stays)."""
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    probs = sorted_lp.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = (rank >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))
