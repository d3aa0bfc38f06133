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


def test_cuda_graph_needs_its_configuration():
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda', dtype='bfloat16' and attention_backend='triton'"):
        EngineConfig(cuda_graph=True)


def test_graph_sizes_cover_every_batch():
    from rollout.engine.cuda_graph import graph_batch_sizes

    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(100)[-2:] == [96, 100]
