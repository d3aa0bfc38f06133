"""SamplingParams: every field inside what the sampler and its kernels take, or a ValueError naming it."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.types import MAX_INT32, MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE, MIN_TOP_P, SamplingParams

# R3_FUZZ_SCALE=100 turns these bounded fuzz tests into the long campaign (docs/benchmarks.md, issue 14).
FUZZ_SCALE = int(os.environ.get("R3_FUZZ_SCALE", "1"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"seed": 2**63}, "seed"),  # would overflow the int64 seed tensor inside step()
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # an int too large for a float
        ({"temperature": 1e-30}, "temperature"),  # rounds to 0 in float32: logits / T overflow
        ({"temperature": MAX_TEMPERATURE * 2}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1e-30}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": True}, "top_p"),
        ({"max_new_tokens": 2**31}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": None}, "max_new_tokens"),
        ({"max_new_tokens": 4.0}, "max_new_tokens"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
    ],
)
def test_out_of_range_values_are_refused_by_name(kwargs, field):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_edges_are_accepted_and_normalised_to_plain_types():
    sp = SamplingParams(np.int64(MAX_INT32), temperature=np.float64(MIN_TEMPERATURE), top_p=MIN_TOP_P,
                        top_k=np.int32(MAX_INT32), seed=np.uint64(MAX_SEED), stop_token_ids=np.array([0, MAX_INT32]))
    assert type(sp.max_new_tokens) is int and type(sp.top_k) is int and type(sp.seed) is int
    assert type(sp.temperature) is float and type(sp.top_p) is float
    assert sp.stop_token_ids == (0, MAX_INT32) and all(type(t) is int for t in sp.stop_token_ids)
    assert SamplingParams(1, temperature=0, top_k=-1, seed=0).greedy
    assert SamplingParams(1, temperature=MAX_TEMPERATURE).temperature == MAX_TEMPERATURE


_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=3), st.lists(st.integers(-(2**40), 2**40), max_size=3),
)


@settings(max_examples=300 * FUZZ_SCALE, deadline=None)
@given(_ANY, _ANY, _ANY, _ANY, _ANY, _ANY)
def test_fuzz_only_value_errors_and_accepted_values_are_in_range(max_new, temp, top_p, top_k, seed, stops):
    try:
        sp = SamplingParams(max_new, temperature=temp, top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stops)
    except ValueError:
        return
    assert 1 <= sp.max_new_tokens <= MAX_INT32
    assert sp.temperature == 0 or MIN_TEMPERATURE <= sp.temperature <= MAX_TEMPERATURE
    assert math.isfinite(sp.temperature) and MIN_TOP_P <= sp.top_p <= 1
    assert sp.top_k == -1 or 1 <= sp.top_k <= MAX_INT32
    assert sp.seed is None or 0 <= sp.seed <= MAX_SEED
    assert all(0 <= t <= MAX_INT32 for t in sp.stop_token_ids)
