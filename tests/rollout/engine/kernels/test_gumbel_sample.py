"""The fused Gumbel-max kernel picks exactly what the engine's torch sampler picks for the same seeds."""

import pytest
import torch

pytest.importorskip("triton")

from rollout.engine.kernels.gumbel_sample import gumbel_argmax
from rollout.engine.sampler import uniform_noise
from kernel_params import DEVICE  # noqa: E402


def torch_pick(candidates, seeds, positions, greedy):
    """The sampler's own noise and argmax, spelled out as ``rollout.engine.sampler.sample`` does it."""
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, candidates.shape[-1])))
    return torch.argmax(torch.where(greedy[:, None], candidates, candidates + gumbel), dim=-1)


def _rows(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (batch,), generator=gen)
    seeds[0] = 0
    seeds[1] = 2**40 + 12345  # high word non-zero
    positions = torch.randint(0, 40000, (batch,), generator=gen)
    return seeds.to(DEVICE), positions.to(DEVICE)


@pytest.mark.parametrize("vocab", [512, 5003])
def test_noise_alone_picks_the_same_token(vocab):
    """Zero logits: the pick is decided by the noise bits alone, so this checks the hash exactly."""
    seeds, positions = _rows(24)
    candidates = torch.zeros(24, vocab, device=DEVICE)
    greedy = torch.zeros(24, dtype=torch.bool, device=DEVICE)
    assert torch.equal(gumbel_argmax(candidates, seeds, positions, greedy, block_v=1024),
                       torch_pick(candidates, seeds, positions, greedy))


def test_logits_truncation_and_greedy_rows():
    seeds, positions = _rows(16, seed=1)
    gen = torch.Generator().manual_seed(2)
    candidates = (torch.randn(16, 3000, generator=gen) * 3).to(DEVICE)
    candidates[2, 100:] = float("-inf")  # a top-k-truncated row
    candidates[3, 7] = candidates[3, 9] = 1e4  # a tie: the lower index must win, as in torch.argmax
    greedy = torch.zeros(16, dtype=torch.bool, device=DEVICE)
    greedy[3:6] = True
    got = gumbel_argmax(candidates, seeds, positions, greedy, block_v=512)
    assert torch.equal(got, torch_pick(candidates, seeds, positions, greedy))
    assert got[2] < 100 and got[3] == 7


def test_noise_that_rounds_to_one_neither_forces_nor_revives_a_token():
    """Seed 3716, position 0, token 386: the 24-bit uniform's top value, which rounds to exactly 1.0 in fp32 unless
    clamped (its Gumbel noise would be +inf). Both paths keep u < 1: a truncated token stays out, a live one is not forced."""
    seeds = torch.tensor([3716, 3716], device=DEVICE)
    positions = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    assert uniform_noise(seeds, positions, 4096)[0, 386].item() == 1.0 - 2.0**-24  # the premise: the top value, clamped
    greedy = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    candidates = torch.zeros(2, 4096, device=DEVICE)
    candidates[0, 386] = float("-inf")  # truncated by top-k/top-p
    candidates[1, 386] = -50.0  # alive but hopeless: finite noise (at most ~16.6) cannot lift it to the top
    got = gumbel_argmax(candidates, seeds, positions, greedy, block_v=1024)
    assert got[0] != 386 and got[1] != 386
    assert torch.isfinite(candidates[0, got[0]])


def test_bad_input_is_refused():
    seeds, positions = _rows(4)
    greedy = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        gumbel_argmax(torch.zeros(4, 10, dtype=torch.float64, device=DEVICE), seeds, positions, greedy)
    with pytest.raises(ValueError, match="positions"):
        gumbel_argmax(torch.zeros(4, 10, device=DEVICE), seeds, positions[:2], greedy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_one_pass_sampler_matches_the_torch_sampler(dtype, splits):
    """``sample_tokens`` (what ``sampler.sample`` runs on CUDA without truncation) against the torch sampler:
    same ids, logprobs to fp32 rounding, greedy rows without noise and with T = 1 logprobs."""
    from rollout.engine.kernels.gumbel_sample import sample_tokens
    from rollout.engine.sampler import SamplingTensors, sample

    batch, vocab = 12, 3001
    seeds, positions = _rows(batch, seed=3)
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(batch, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3] * 3, device=DEVICE)
    ids, logprobs = sample_tokens(logits, temperature, seeds, positions, block_v=512, splits=splits)
    params = SamplingTensors(temperature=temperature.cpu(), top_p=torch.full((batch,), 2.0), top_k=torch.full((batch,), vocab),
                             seeds=seeds.cpu(), positions=positions.cpu(), needs_truncation=False, all_greedy=False)
    ref_ids, ref_lp = sample(logits.float().cpu(), params)  # the torch path (CPU)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.allclose(logprobs.cpu(), ref_lp, atol=1e-5, rtol=0)
    greedy = temperature.cpu() == 0
    assert torch.equal(ids.cpu()[greedy], logits.float().cpu()[greedy].argmax(-1))
