import pytest

from rollout.engine.config import EngineConfig


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(kv_slots=0), "kv_slots must be a positive integer"),
        (dict(max_batch_tokens=True), "max_batch_tokens must be a positive integer"),
        (dict(max_context=1), "max_context must be an integer >= 2"),
        (dict(overlap="yes"), "overlap must be True or False"),
        (dict(device="tpu:0"), "bad device"),
        (dict(kv_slot=10), r"unknown engine option\(s\) \['kv_slot'\]"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_context_limit_is_clipped_to_the_pool():
    assert EngineConfig(kv_slots=100).context_limit(2048) == 100
    assert EngineConfig(max_context=64).context_limit(2048) == 64
    assert EngineConfig().context_limit(2048) == 2048
