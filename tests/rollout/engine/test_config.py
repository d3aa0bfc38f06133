import pytest

from rollout.engine.config import CPU_MAX_BATCH_TOKENS, CUDA_MAX_BATCH_TOKENS, EngineConfig, checkpoint_dtype


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(kv_slots=0), "kv_slots must be a positive integer"),
        (dict(max_batch_tokens=True), "max_batch_tokens must be a positive integer"),
        (dict(max_running_requests=2.0), "max_running_requests must be a positive integer"),
        (dict(max_context=1), "max_context must be an integer >= 2"),
        (dict(overlap="yes"), "overlap must be True or False"),
        (dict(cuda_graph="on"), "cuda_graph must be True, False or None"),
        (dict(device="tpu:0"), "bad device"),
        (dict(kv_slot=10), r"unknown engine option\(s\) \['kv_slot'\]"),
        (dict(moe_backend="cutlass"), "moe_backend must be one of"),
        (dict(layer_kernels="fast"), "layer_kernels must be one of"),
        (dict(prefill_attention_backend="flash"), "prefill_attention_backend must be one of"),
        (dict(mem_fraction_static=1.0), r"mem_fraction_static must be a number in \(0, 1\)"),
        (dict(mem_fraction_static=0.5), "mem_fraction_static sizes the KV pool from device memory: it needs device='cuda'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_context_limit_is_clipped_to_the_pool():
    assert EngineConfig(kv_slots=100).context_limit(2048) == 100
    assert EngineConfig(max_context=64).context_limit(2048) == 64
    assert EngineConfig(kv_slots=65536).context_limit(2048) == 2048
    assert EngineConfig().context_limit(2048) == 2048  # pool not sized yet


def test_cpu_defaults_stay_the_torch_float32_path():
    c = EngineConfig().resolved("bfloat16")
    assert (c.dtype, c.attention_backend, c.prefill_attention_backend, c.moe_backend, c.layer_kernels, c.cuda_graph) == (
        "float32", "torch", "torch", "torch", "torch", False)
    assert c.max_batch_tokens == CPU_MAX_BATCH_TOKENS and c.is_resolved


def test_cuda_defaults_are_the_fast_path():
    values = EngineConfig().defaults_for(cuda=True, checkpoint_dtype="bfloat16")
    assert values == dict(dtype="bfloat16", attention_backend="triton", prefill_attention_backend="triton",
                          moe_backend="triton", layer_kernels="triton", max_batch_tokens=CUDA_MAX_BATCH_TOKENS,
                          cuda_graph=True)
    assert EngineConfig().defaults_for(cuda=True, checkpoint_dtype="float32")["dtype"] == "float32"
    assert EngineConfig().defaults_for(cuda=True, checkpoint_dtype=None)["dtype"] == "bfloat16"
    # explicit choices win; torch experts cannot be graphed, so the graph default follows them
    custom = EngineConfig(dtype="float16", prefill_attention_backend="torch", moe_backend="torch")
    values = custom.defaults_for(cuda=True, checkpoint_dtype="bfloat16")
    assert (values["dtype"], values["prefill_attention_backend"], values["attention_backend"], values["cuda_graph"]) == (
        "float16", "torch", "triton", False)


def test_checkpoint_dtype_reads_both_spellings():
    assert checkpoint_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert checkpoint_dtype({"torch_dtype": "float16"}) == "float16"
    assert checkpoint_dtype({}) is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cuda_graph=True), "cuda_graph=True needs device='cuda'"),
        (dict(moe_backend="grouped_mm"), "moe_backend='grouped_mm' needs device='cuda' and dtype='bfloat16'"),
    ],
)
def test_impossible_combinations_fail_when_resolved(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options).resolved()


def test_graph_sizes_cover_every_batch_with_little_padding():
    from rollout.engine.cuda_graph import graph_batch_sizes, padded_batch_size

    sizes = graph_batch_sizes(1024)
    assert sizes[:7] == [1, 2, 4, 8, 12, 16, 24] and sizes[-1] == 1024
    assert {1 << i for i in range(11)} <= set(sizes)  # the fused-MoE config keys are graph sizes
    for b in range(17, 1025):
        assert 0 <= padded_batch_size(b, sizes) - b < max(8, b / 16)
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(100)[-2:] == [96, 100]


def test_pool_and_running_requests_from_memory_plan():
    from rollout.engine.memory import (MAX_RUNNING_REQUESTS, MIN_RUNNING_REQUESTS, derived_max_running,
                                       kv_bytes_per_slot, size_from_memory)
    from rollout.engine.models.arch import ExpertNames, ModelArch
    import torch

    arch = ModelArch(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=12, num_heads=32, num_kv_heads=4,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_positions=40960, tie_word_embeddings=False, qk_norm=True,
        qkv_bias=False, moe_layers=tuple(range(12)), num_experts=128, top_k=8, moe_intermediate_size=768,
        dense_intermediate_size=6144, norm_topk_prob=True, router_weights_fp32=False,
        shared_expert_intermediate_size=0, expert_names=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj"))
    assert kv_bytes_per_slot(arch, torch.bfloat16) == 2 * 12 * 4 * 128 * 2  # 24 KiB a token: K and V, every layer
    cpu = size_from_memory(EngineConfig().resolved(), arch, torch.float32)
    assert (cpu.kv_slots, cpu.max_running_requests) == (65536, 256)
    assert size_from_memory(EngineConfig(kv_slots=64).resolved(), arch, torch.float32).max_running_requests == MIN_RUNNING_REQUESTS
    assert size_from_memory(EngineConfig(kv_slots=64, max_running_requests=3).resolved(), arch,
                            torch.float32).max_running_requests == 3
    assert derived_max_running(4_000_000) == MAX_RUNNING_REQUESTS and derived_max_running(128 * 1024) == 512
