"""Acceptance checks on CUDA: async copies, pinned staging, graphs and the Triton kernels compiled for the chip.

The strict checks run without stop tokens, so overlap on/off and graphs/eager see the same
batch shapes step by step; then every request must be bit-identical (tokens, routes,
logprobs), not "most of them".
"""

import pytest
import torch

from rollout.engine.engine import Engine
from rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = [5, 17, 300, 42, 7, 99, 123, 4, 250, 11, 3, 480]
TORCH_PATH = dict(attention_backend="torch", moe_backend="torch", layer_kernels="torch", overlap=False)


def _workload(stop_tokens=()):
    prompts = [[(7 * i + 3 * j) % 512 for j in range(4 + i)] for i in range(12)]
    sampling = [SamplingParams(max_new_tokens=10 + i, temperature=[0.0, 1.0][i % 2], seed=i, stop_token_ids=stop_tokens)
                for i in range(12)]
    return prompts, sampling


def _identical(a, b) -> bool:
    return a.output_ids == b.output_ids and a.output_logprobs == b.output_logprobs and a.routed_experts == b.routed_experts


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral"])
@pytest.mark.parametrize("path_options", [{}, TORCH_PATH], ids=["fast-kernels", "torch-ops"])
def test_cuda_fp32_logits_and_greedy_match_transformers(tiny_model_dir, preset, path_options):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(preset)
    engine = Engine(path, device="cuda", dtype="float32", **path_options)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT], device="cuda")).logits[0].float().cpu()
    assert (engine.prompt_logits(PROMPT) - ref).abs().max().item() <= 1e-4
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=32, temperature=0))[0]
    gen = hf.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.output_ids == gen[0, len(PROMPT):].tolist()
    engine.close()


def test_cuda_defaults_are_the_fast_path(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen3-moe")  # a bfloat16 checkpoint
    engine = Engine(path, device="cuda")
    c = engine.config
    assert (c.dtype, c.attention_backend, c.prefill_attention_backend, c.moe_backend, c.layer_kernels, c.cuda_graph) == (
        "bfloat16", "triton", "triton", "triton", "triton", True)
    assert c.kv_slots >= 1 << 20 and c.max_running_requests >= 256  # sized from free memory
    assert engine.graphs.sizes[-1] == min(c.max_running_requests, c.max_batch_tokens)
    engine.close()


def test_cuda_torch_experts_refuse_overlap():
    from rollout.engine.config import EngineConfig

    with pytest.raises(ValueError, match="synchronises every layer"):
        EngineConfig(device="cuda", moe_backend="torch").resolved()
    assert not EngineConfig(device="cuda", moe_backend="torch", overlap=False).resolved().cuda_graph


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graphs"])
def test_cuda_overlap_on_off_bit_identical(tiny_model_dir, dtype, cuda_graph):
    path = tiny_model_dir("tiny-qwen3-moe")
    prompts, sampling = _workload()
    options = dict(device="cuda", dtype=dtype, cuda_graph=cuda_graph, max_running_requests=16, kv_slots=4096)
    plain = Engine(path, overlap=False, **options)
    overlap = Engine(path, overlap=True, **options)
    a, b = plain.generate(prompts, sampling), overlap.generate(prompts, sampling)
    same = sum(_identical(x, y) for x, y in zip(a, b))
    print(f"cuda {dtype} graphs={cuda_graph}: {same}/{len(a)} requests identical with overlap off and on")
    assert same == len(a)
    plain.close(), overlap.close()


def test_cuda_graph_decode_bit_identical_to_eager(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen3-moe")
    prompts, sampling = _workload()
    options = dict(device="cuda", dtype="bfloat16", max_running_requests=16, kv_slots=4096)
    eager = Engine(path, cuda_graph=False, **options)
    graphed = Engine(path, cuda_graph=True, **options)
    a, b = eager.generate(prompts, sampling), graphed.generate(prompts, sampling)
    assert graphed.graphs.replays > 0, "decode steps should have replayed graphs"
    for r in b:
        assert r.routed_experts.ids.shape == (len(r.prompt_ids) + len(r.output_ids) - 1, 4, 2)
        assert r.routed_experts.row_mask().all()
    same = sum(_identical(x, y) for x, y in zip(a, b))
    print(f"cuda graph vs eager (bf16): {same}/{len(a)} requests identical")
    assert same == len(a)
    eager.close(), graphed.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_steps_never_synchronise(tiny_model_dir, dtype):
    """A step only waits on its copy_done event: any synchronising op in the loop (a .tolist() of a device
    tensor, a copy to unpinned memory) raises under sync debug mode. Covers eager prefill and graphed decode."""
    path = tiny_model_dir("tiny-qwen3-moe")
    prompts, sampling = _workload()
    engine = Engine(path, device="cuda", dtype=dtype, max_running_requests=16, kv_slots=4096)
    engine.generate(prompts, sampling)  # warm-up: kernels compiled, pinned buffers allocated
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = engine.generate([p + [1] for p in prompts], sampling)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(len(r.output_ids) == s.max_new_tokens for r, s in zip(out, sampling))
    engine.close()


def test_cuda_overlap_preemption_and_stop_tokens(tiny_model_dir):
    """Stop tokens (seen one step late under overlap) and a pool small enough to preempt: same tokens and routes."""
    path = tiny_model_dir("tiny-qwen3-moe")
    prompts, sampling = _workload(stop_tokens=(7, 11, 13))
    plain = Engine(path, device="cuda", dtype="float32", overlap=False, enable_prefix_cache=False).generate(prompts, sampling)
    small = Engine(path, device="cuda", dtype="float32", kv_slots=64, max_batch_tokens=32, cuda_graph=False)
    tight = small.generate(prompts, sampling)
    assert small.stats["preemptions"] > 0
    assert all(a.output_ids == b.output_ids and a.routed_experts == b.routed_experts for a, b in zip(plain, tight))
    on_cpu = Engine(path, device="cpu", dtype="float32").generate(prompts, sampling)
    tokens_equal = sum(a.output_ids == b.output_ids for a, b in zip(plain, on_cpu))
    assert tokens_equal >= len(prompts) - 1, "CUDA and CPU fp32 should agree but for a rare near-tie"


@pytest.mark.parametrize("num_tokens", [1, 64, 256, 512, 4096])
def test_fused_moe_at_bench_shapes(num_tokens):
    """bench-qwen3-moe's expert shapes with the configs the engine picks (shared-memory limits, tile shapes)."""
    from rollout.engine.kernels.fused_moe import fused_experts
    from rollout.engine.models.layers import experts_grouped_mm

    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    experts, top_k, hidden, inter = 128, 8, 2048, 768
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    top_w, top_ids = torch.randn(num_tokens, experts, device="cuda", generator=gen).softmax(-1).topk(top_k, dim=-1)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden**0.5).bfloat16()
    down = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter**0.5).bfloat16()
    out = fused_experts(x, top_ids, top_w.bfloat16(), gate_up, down)
    ref = _fp32_experts(x, top_ids, top_w, gate_up, down)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    assert torch.equal(out, fused_experts(x, top_ids, top_w.bfloat16(), gate_up, down))  # run to run
    if num_tokens >= 64:  # the grouped GEMM fallback computes the same function
        alt = experts_grouped_mm(x, top_ids, top_w.bfloat16(), gate_up, down)
        assert ((alt.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("check", ["fused_moe", "decode_attention", "prefill_attention", "layer_kernels"])
def test_every_kernel_at_bench_shapes(check):
    """Each Triton kernel compiled for bench-qwen3-moe's shapes (bf16) agrees with its fp32 reference
    (the checks the kernels stage of bench/gpu_suite.sh records; compiled here first, then cached)."""
    from bench.kernels_microbench import CHECKS, Shapes

    result = CHECKS[check][0](Shapes(), torch.bfloat16, "cuda", lambda fn: 0.0)
    assert result["ok"], result


def _fp32_experts(x, top_ids, top_w, gate_up, down):
    """Dense fp32 reference: every token through its experts, one expert at a time (no host sync needed here)."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for e in range(gate_up.shape[0]):
        token, slot = (top_ids == e).nonzero(as_tuple=True)
        if token.numel():
            gate, up = (x[token].float() @ gate_up[e].float().T).chunk(2, dim=-1)
            out.index_add_(0, token, (torch.nn.functional.silu(gate) * up) @ down[e].float().T * top_w[token, slot, None])
    return out


def test_cuda_sampler_draws_the_same_noise_as_cpu():
    from rollout.engine.sampler import SamplingTensors, sample

    def params(device):
        n = 64
        return SamplingTensors(
            temperature=torch.full((n,), 0.8, device=device), top_p=torch.full((n,), 2.0, device=device),
            top_k=torch.full((n,), 1000, dtype=torch.int64, device=device),
            seeds=torch.arange(n, dtype=torch.int64, device=device) * 7919,
            positions=torch.arange(n, dtype=torch.int64, device=device) + 100,
            needs_truncation=False, all_greedy=False,
        )

    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    on_cpu, _ = sample(logits, params("cpu"))
    on_gpu, _ = sample(logits.cuda(), params("cuda"))
    assert (on_cpu == on_gpu.cpu()).float().mean().item() >= 0.98  # only last-ulp ties may differ
