import math

import torch

from rollout.engine.sampler import SamplingTensors, sample, uniform_noise


def _params(n, temperature=1.0, top_p=1.0, top_k=None, seeds=None, positions=None, vocab=50):
    temps = torch.full((n,), float(temperature))
    return SamplingTensors(
        temperature=temps,
        top_p=torch.full((n,), float(top_p) if top_p < 1 else 2.0),
        top_k=torch.full((n,), top_k or vocab, dtype=torch.int64),
        seeds=torch.as_tensor(seeds if seeds is not None else list(range(n)), dtype=torch.int64),
        positions=torch.as_tensor(positions if positions is not None else [0] * n, dtype=torch.int64),
        needs_truncation=top_p < 1 or top_k is not None,
        all_greedy=temperature == 0,
    )


def test_noise_is_a_function_of_seed_and_position_only():
    a = uniform_noise(torch.tensor([3, 9, 2**62]), torch.tensor([5, 5, 7]), 64)
    b = uniform_noise(torch.tensor([9, 2**62]), torch.tensor([5, 7]), 64)  # other batch, other order
    assert torch.equal(a[1:], b)
    assert not torch.equal(a[0], a[1])
    assert 0 < a.min() and a.max() < 1
    assert not torch.equal(uniform_noise(torch.tensor([3]), torch.tensor([6]), 64), a[:1])


def test_noise_is_uniform_enough():
    u = uniform_noise(torch.arange(200), torch.zeros(200, dtype=torch.int64), 500).flatten()
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - u.numel() / 10).abs().max() < 0.03 * u.numel() / 10  # every bin within 3% of its expected count


def test_sampled_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(4000, 1)
    ids, _ = sample(logits, _params(4000, seeds=list(range(4000)), vocab=4))
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)


def test_greedy_takes_argmax_and_logprob_is_untempered():
    logits = torch.randn(3, 50)
    ids, lps = sample(logits, _params(3, temperature=0))
    assert torch.equal(ids, logits.argmax(-1))
    assert torch.allclose(lps, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1))


def test_top_k_and_top_p_restrict_support_but_logprob_is_before_truncation():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]).repeat(500, 1)
    ids, lps = sample(logits, _params(500, top_k=2, vocab=5, seeds=list(range(500))))
    assert set(ids.tolist()) == {0, 1}
    full = torch.log_softmax(logits[0], -1)
    assert torch.allclose(lps, full[ids])
    probs = torch.softmax(logits[0], -1)  # ~[.64, .24, .09, ...]: top_p=0.7 keeps the first two
    ids, _ = sample(logits, _params(500, top_p=0.7, vocab=5, seeds=list(range(500))))
    assert set(ids.tolist()) == {0, 1} and probs[0] < 0.7 < probs[0] + probs[1]


def test_temperature_scales_logprob():
    logits = torch.randn(1, 20)
    ids, lps = sample(logits, _params(1, temperature=0.5, vocab=20))
    assert math.isclose(lps.item(), torch.log_softmax(logits / 0.5, -1)[0, ids.item()].item(), rel_tol=1e-5)
