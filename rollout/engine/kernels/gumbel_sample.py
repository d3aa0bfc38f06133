"""Gumbel-max sampling with counter-based noise, fused into one pass over the logits.

``sample_tokens`` is the whole sampler for rows without top-p/top-k (ids and logprobs);
``gumbel_argmax`` the pick alone, for candidates a torch truncation already masked.

The engine's sampler (``rollout.engine.sampler``) draws its noise as
``u = hash(seed, position, vocab index)`` so that a request's randomness does not
depend on its batch. In torch that is about twenty elementwise ops over an int64
``[B, V]`` tensor: at batch 256 and Qwen's 151,936-token vocabulary each op moves
about 0.6 GB, several milliseconds per decode step, as much as reading the
weights. This kernel computes the same hash in registers and keeps only a running
argmax, so it reads the ``[B, V]`` candidates once and writes ``[B]`` ids.

The hash is the same 32-bit mixer (lowbias32) as the sampler's; its int64
version masks to 32 bits after every step, so uint32 arithmetic gives the same
bits. The float part (``-log(-log(u))``) may differ from torch's in the last ulp,
which changes the pick only when two noisy logits tie to within an ulp. One
deliberate difference: ``u`` is kept below 1 (see the kernel), where the torch
sampler's ``u`` can round to exactly 1.0 and its Gumbel noise becomes +inf.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch sampler
    triton = None


def gumbel_argmax(candidates: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, greedy: torch.Tensor,
                  block_v: int = 2048) -> torch.Tensor:
    """``argmax(candidates + gumbel(seed, position, v))`` per row, or plain argmax where ``greedy``.

    Args:
        candidates: ``[B, V]`` float32 scaled logits, ``-inf`` where top-k/top-p dropped a token.
        seeds, positions: ``[B]`` int64, non-negative: the request seed and the position being sampled.
        greedy: ``[B]`` bool.
    Returns ``[B]`` int64 token ids; the lowest index wins a tie, as in ``torch.argmax``.
    """
    if triton is None:
        raise RuntimeError("gumbel_argmax needs triton")
    batch, vocab = candidates.shape
    if candidates.dtype != torch.float32 or candidates.stride(1) != 1:
        raise ValueError(f"candidates must be float32 with contiguous rows, got {candidates.dtype}")
    for name, t in (("seeds", seeds), ("positions", positions), ("greedy", greedy)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must be [B] with B={batch}, got {tuple(t.shape)}")
    out = torch.empty(batch, dtype=torch.int64, device=candidates.device)
    _gumbel_argmax_kernel[(batch,)](candidates, seeds, positions, greedy.to(torch.int8), out,
                                    candidates.stride(0), vocab, BLOCK_V=block_v)
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  block_v: int = 1024, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole untruncated sampler in one pass over the logits: ids and their logprobs.

    Same function as ``rollout.engine.sampler.sample`` without top-p/top-k: scaled logits
    ``logits / T`` (``T = 1`` where ``temperature == 0``, a greedy row, which gets no noise),
    ``id = argmax(scaled + gumbel(seed, position, v))`` and ``logprob = scaled[id] - logsumexp(scaled)``.
    The torch path makes about ten passes over ``[B, V]`` in fp32 (the cast, the division, log_softmax's
    three, the noise); this reads the logits once, in their own dtype (bf16 at 2 bytes an element).
    Each row's vocabulary is cut into ``splits`` ranges, one program each (enough programs to fill the
    chip at small batches; ``None`` picks them from the multiprocessor count), and a second small kernel
    merges the ranges' logsumexp and best pick.

    Args:
        logits: ``[B, V]`` float32/bfloat16/float16 with contiguous rows.
        temperature: ``[B]`` float, 0 for greedy; seeds, positions: ``[B]`` int64, non-negative.
    Returns ``[B]`` int64 ids (lowest index on a tie) and ``[B]`` float32 logprobs.
    """
    if triton is None:
        raise RuntimeError("sample_tokens needs triton")
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits need contiguous rows")
    for name, t in (("temperature", temperature), ("seeds", seeds), ("positions", positions)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must be [B] with B={batch}, got {tuple(t.shape)}")
    ids = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if not batch:
        return ids, logprobs
    if splits is None:
        programs = 4 * _multiprocessors(logits.device)
        splits = max(1, min(MAX_SPLITS, triton.cdiv(programs, batch)))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v  # each split a whole number of blocks
    splits = triton.cdiv(vocab, chunk)
    partial = torch.empty(5, batch, splits, dtype=torch.float32, device=logits.device)  # max, sum, best, idx, scaled
    _sample_split_kernel[(batch, splits)](logits, temperature, seeds, positions, partial, logits.stride(0), vocab,
                                          chunk, batch * splits, BLOCK_V=block_v)
    _sample_merge_kernel[(batch,)](partial, ids, logprobs, splits, batch * splits,
                                   BLOCK_S=triton.next_power_of_2(splits))
    return ids, logprobs


MAX_SPLITS = 32


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


if triton is not None:

    @triton.jit
    def _hash32(x):
        """lowbias32 on uint32 (wrapping multiplies keep exactly the low 32 bits the int64 version keeps)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(cand_ptr, seeds_ptr, positions_ptr, greedy_ptr, out_ptr, stride_b, vocab,
                              BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seeds_ptr + row)
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        seed_hi = (seed >> 32).to(tl.uint32)
        seed_key = _hash32(_hash32(seed_lo) ^ seed_hi)
        position = (tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
        row_key = _hash32(seed_key ^ _hash32(position))
        noise_scale = tl.where(tl.load(greedy_ptr + row) != 0, 0.0, 1.0)

        best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK_V], 2147483647, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            v = start + tl.arange(0, BLOCK_V)
            ok = v < vocab
            logits = tl.load(cand_ptr + row * stride_b + v, mask=ok, other=float("-inf"))
            bits = _hash32(row_key ^ _hash32(v.to(tl.uint32) + 0x9E3779B9))  # the sampler's vocab salt
            # the top 24-bit value, (2^24 - 0.5) / 2^24, rounds to exactly 1.0 in fp32, where -log(-log(u)) is +inf:
            # such a token (about 1 row in 110 at a 151,936 vocabulary) would win whatever its logit, and a
            # truncated one (-inf + inf = NaN) as well. Clamp to the largest float below 1, which no other value reaches.
            u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)
            noisy = logits + noise_scale * -tl.log(-tl.log(u))
            noisy = tl.where(ok, noisy, float("-inf"))
            better = noisy > best_val  # strict: an earlier block keeps a tie
            best_val = tl.where(better, noisy, best_val)
            best_idx = tl.where(better, v, best_idx)
        top = tl.max(best_val, axis=0)
        winner = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)  # lowest index among equals
        tl.store(out_ptr + row, winner.to(tl.int64))

    @triton.jit(do_not_specialize=["plane"])
    def _sample_split_kernel(logits_ptr, temp_ptr, seeds_ptr, positions_ptr, partial_ptr, stride_b, vocab, chunk, plane,
                             BLOCK_V: tl.constexpr):
        """One row's range ``[split * chunk, (split + 1) * chunk)``: its logsumexp as (max, sum) and its best pick."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        temp = tl.load(temp_ptr + row).to(tl.float32)
        greedy = temp == 0.0
        temp = tl.where(greedy, 1.0, temp)
        noise_scale = tl.where(greedy, 0.0, 1.0)
        seed = tl.load(seeds_ptr + row)
        seed_key = _hash32(_hash32((seed & 0xFFFFFFFF).to(tl.uint32)) ^ (seed >> 32).to(tl.uint32))
        row_key = _hash32(seed_key ^ _hash32((tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)))

        lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane online logsumexp
        lane_sum = tl.zeros([BLOCK_V], tl.float32)
        best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK_V], 2147483647, tl.int32)
        best_scaled = tl.zeros([BLOCK_V], tl.float32)
        begin = split * chunk
        end = tl.minimum(begin + chunk, vocab)
        for start in range(begin, end, BLOCK_V):
            v = start + tl.arange(0, BLOCK_V)
            ok = v < end
            scaled = tl.load(logits_ptr + row.to(tl.int64) * stride_b + v, mask=ok, other=float("-inf")).to(tl.float32) / temp
            new_max = tl.maximum(lane_max, scaled)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with nothing yet: exp(-inf) = 0, never NaN
            lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(scaled - safe)
            lane_max = new_max
            bits = _hash32(row_key ^ _hash32(v.to(tl.uint32) + 0x9E3779B9))
            u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)  # see _gumbel_argmax_kernel
            noisy = tl.where(ok, scaled + noise_scale * -tl.log(-tl.log(u)), float("-inf"))
            better = noisy > best_val  # strict: an earlier block keeps a tie
            best_val = tl.where(better, noisy, best_val)
            best_idx = tl.where(better, v, best_idx)
            best_scaled = tl.where(better, scaled, best_scaled)
        range_max = tl.max(lane_max, axis=0)
        safe_max = tl.where(range_max == float("-inf"), 0.0, range_max)
        range_sum = tl.sum(lane_sum * tl.exp(lane_max - safe_max), axis=0)
        top = tl.max(best_val, axis=0)
        winner = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)  # lowest index among equals
        winner_scaled = tl.max(tl.where(best_idx == winner, best_scaled, float("-inf")), axis=0)
        at = partial_ptr + row * tl.num_programs(1) + split
        tl.store(at, range_max)
        tl.store(at + plane, range_sum)
        tl.store(at + 2 * plane, top)
        tl.store(at + 3 * plane, winner.to(tl.float32))  # < 2^24: exact in fp32
        tl.store(at + 4 * plane, winner_scaled)

    @triton.jit(do_not_specialize=["plane"])
    def _sample_merge_kernel(partial_ptr, ids_ptr, logprob_ptr, splits, plane, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK_S)
        ok = i < splits
        at = partial_ptr + row * splits + i
        range_max = tl.load(at, mask=ok, other=float("-inf"))
        range_sum = tl.load(at + plane, mask=ok, other=0.0)
        best = tl.load(at + 2 * plane, mask=ok, other=float("-inf"))
        idx = tl.load(at + 3 * plane, mask=ok, other=3.0e38)
        scaled = tl.load(at + 4 * plane, mask=ok, other=float("-inf"))
        row_max = tl.max(range_max, axis=0)
        lse = row_max + tl.log(tl.sum(tl.where(range_max == float("-inf"), 0.0, range_sum * tl.exp(range_max - row_max)), axis=0))
        top = tl.max(best, axis=0)
        winner = tl.min(tl.where(best == top, idx, 3.0e38), axis=0)  # ranges are in vocabulary order: lowest id wins a tie
        winner_scaled = tl.max(tl.where(idx == winner, scaled, float("-inf")), axis=0)
        tl.store(ids_ptr + row, winner.to(tl.int64))
        tl.store(logprob_ptr + row, winner_scaled - lse)
