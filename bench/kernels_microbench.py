"""Per-layer timings of the kernels in this package against the torch paths they replace, at decode shapes.

These are the numbers the predictions in the GPU report rest on: a per-layer
saving times the number of layers is an upper bound on the per-step saving.

Run on a GPU: ``python -m bench.kernels_microbench --json $OUT/microbench.json``
(defaults: bench-qwen3-moe shapes, batches 64 and 256, 160 context tokens).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
import torch.nn.functional as F

from bench.roofline import time_per_call
from rollout.atomic import atomic_write_text
from rollout.engine.kernels.gumbel_sample import gumbel_argmax
from rollout.engine.kernels.paged_decode_attention import paged_decode_attention
from rollout.engine.models.layers import experts_forward


def _ms(fn: Callable[[], object], iters: int = 50) -> float:
    """Milliseconds per call on the GPU; on CPU a smoke run of the code paths, not a measurement."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return time_per_call(fn, device, iters if device.type == "cuda" else 1, warmup=5 if device.type == "cuda" else 1) * 1e3


def _graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` recorded once in a CUDA graph; raises if it synchronises with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def gather_sdpa_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_table: torch.Tensor,
                          seq_lens: torch.Tensor) -> torch.Tensor:
    """What a torch engine does for decode: gather each sequence's K/V into a padded copy, then masked SDPA."""
    keys = k_pool[slot_table].transpose(1, 2)  # [B, Hkv, S, D]
    values = v_pool[slot_table].transpose(1, 2)
    mask = torch.arange(slot_table.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out[:, :, 0]


def bincount_experts(x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """The engine's grouped GEMM as first written: offsets from ``torch.bincount``, which reads the largest id
    back to the host (a sync per MoE layer); the engine now takes them from ``searchsorted``."""
    n, k = top_ids.shape
    flat = top_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = x[order // k]
    offsets = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out_sorted = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    per_choice = torch.empty_like(out_sorted)
    per_choice[order] = out_sorted
    return (per_choice.view(n, k, -1) * top_w.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def attention_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, dev: str) -> dict:
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    slots = batch * context + 1
    k_pool = torch.randn(slots, kv_heads, head_dim, device=dev, dtype=dt)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(batch, heads, head_dim, device=dev, dtype=dt)
    table = torch.randperm(slots - 1, device=dev)[: batch * context].view(batch, context) + 1
    lens = torch.randint(context // 2, context + 1, (batch,), device=dev)
    ref = gather_sdpa_attention(q, k_pool, v_pool, table, lens)
    out = paged_decode_attention(q, k_pool, v_pool, table, lens)
    return dict(
        rel_err=((out.float() - ref.float()).norm() / ref.float().norm()).item(),
        gather_sdpa_ms=_ms(lambda: gather_sdpa_attention(q, k_pool, v_pool, table, lens)),
        paged_kernel_ms=_ms(lambda: paged_decode_attention(q, k_pool, v_pool, table, lens)),
        kv_bytes_read=2 * int(lens.sum()) * kv_heads * head_dim * 2,
    )


def experts_case(batch: int, num_experts: int, top_k: int, hidden: int, inter: int, dev: str) -> dict:
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(batch, hidden, device=dev, dtype=dt)
    top_w, top_ids = torch.randn(batch, num_experts, device=dev).softmax(-1).topk(top_k, dim=-1)
    top_w = top_w.to(dt)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dt) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, device=dev, dtype=dt) / inter**0.5
    args = (x, top_ids, top_w, gate_up, down)
    result = dict(
        weight_bytes=(gate_up.numel() + down.numel()) * 2,
        bincount_eager_ms=_ms(lambda: bincount_experts(*args)),
        engine_eager_ms=_ms(lambda: experts_forward(*args)),
    )
    if dev == "cuda":
        result["engine_graph_ms"] = _ms(_graphed(lambda: experts_forward(*args)))
    return result


def sampling_case(batch: int, vocab: int, dev: str) -> dict:
    """The engine's torch Gumbel-max (noise from ``rollout.engine.sampler``) against the fused kernel."""
    from rollout.engine.sampler import uniform_noise

    candidates = torch.randn(batch, vocab, device=dev)
    seeds = torch.randint(0, 2**62, (batch,), device=dev)
    positions = torch.randint(0, 200, (batch,), device=dev)
    greedy = torch.zeros(batch, dtype=torch.bool, device=dev)

    def torch_pick() -> torch.Tensor:
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
        return torch.argmax(torch.where(greedy[:, None], candidates, candidates + gumbel), dim=-1)

    return dict(
        # rows may differ where the torch noise rounds to u == 1.0 (+inf Gumbel; the kernel clamps u below 1)
        differing_rows=int((torch_pick() != gumbel_argmax(candidates, seeds, positions, greedy)).sum()),
        torch_ms=_ms(torch_pick, iters=20),
        fused_ms=_ms(lambda: gumbel_argmax(candidates, seeds, positions, greedy), iters=20),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context", type=int, default=160, help="tokens attended per sequence (128 prompt + ~32 generated)")
    p.add_argument("--heads", type=int, nargs=3, default=[32, 4, 128], metavar=("HQ", "HKV", "D"))
    p.add_argument("--experts", type=int, nargs=4, default=[128, 8, 2048, 768], metavar=("E", "K", "H", "I"))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the code paths (TRITON_INTERPRET=1)
    cases = {
        "attention": lambda b: attention_case(b, args.context, *args.heads, dev),
        "experts": lambda b: experts_case(b, *args.experts, dev),
        "sampling": lambda b: sampling_case(b, args.vocab, dev),
    }
    report: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    for name, case in cases.items():
        for b in args.batch:
            try:  # one failing kernel must not hide the others' numbers
                report.setdefault(name, {})[b] = case(b)
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                report.setdefault(name, {})[b] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name} batch {b}: {report[name][b]}", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
