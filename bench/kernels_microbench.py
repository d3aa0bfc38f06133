"""The kernels stage: check every Triton kernel at ``bench-qwen3-moe``'s shapes, time it against the path it
replaces, and tune the fused MoE and decode-attention launch configurations for this device.

1. **Checks** (a kernel that fails to compile or disagrees with its reference is recorded, never fatal):
   each kernel at the engine's real shapes against a float32 reference; ``--fallbacks FILE`` gets the
   engine options that avoid the failed ones (``moe_backend=grouped_mm``, ``layer_kernels=torch``, ...),
   which ``bench/gpu_suite.sh`` hands to the throughput stage.
2. **Fused MoE tuning**: for each token-count key (decode batches first, then prefill chunks), each
   block height and each GEMM's tile candidates are timed on their own (the layout is shared), and
   the fastest combination is kept. Time left over goes to the next key; keys never reached keep the
   built-in default. Reported beside ``torch._grouped_mm`` (the previous engine path) with the
   bandwidth reached on the active experts' weights.
3. **Decode attention tuning** (with the time the MoE leaves): block size, warps and pipeline depth at
   three (batch, context) points.

The tables land in ``--tune-dir`` under the names ``rollout.engine.kernels.tuned`` looks for, so
exporting ``R3_KERNEL_CONFIG_DIR`` to that folder makes the engine use them.

GPU: ``python -m bench.kernels_microbench --tune-dir /tmp/r3-kernels --fallbacks /tmp/r3-kernels/fallbacks.json --json $OUT/kernels.json``
CPU smoke run (the interpreter, tiny shapes, timings meaningless): ``python -m bench.kernels_microbench --quick``
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before any kernel module is imported: triton.jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rollout.atomic import atomic_write_text  # noqa: E402
from rollout.engine.kernels import fused_moe  # noqa: E402
from rollout.engine.kernels.fused_moe import GemmConfig, MoEConfig, MoEShape, fused_experts, pair_layout  # noqa: E402
from rollout.engine.kernels.paged_decode_attention import (  # noqa: E402
    DecodeConfig, config_file_name, paged_decode_attention, paged_decode_attention_ref,
)
from rollout.engine.kernels.tuned import device_tag  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    experts: int = 128
    top_k: int = 8
    hidden: int = 2048
    inter: int = 768
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 151936
    check_tokens: tuple[int, ...] = (64, 512, 8192)
    moe_keys: tuple[int, ...] = (256, 512, 64, 8192, 128, 1024, 32, 2048, 4096, 16, 8, 1)
    decode_points: tuple[tuple[int, int], ...] = ((256, 1280), (512, 1024), (64, 192))


QUICK = Shapes(experts=8, top_k=2, hidden=64, inter=32, heads=4, kv_heads=2, head_dim=16, vocab=512,
               check_tokens=(5, 24), moe_keys=(8, 64), decode_points=((4, 40),))
# per-GEMM tile candidates (block_n, block_k, num_warps, num_stages), and block heights by token-count key
UP_CANDIDATES = ((64, 128, 4, 4), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4),
                 (64, 256, 4, 3), (128, 64, 8, 4))
DOWN_CANDIDATES = ((128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                   (128, 256, 8, 3), (256, 128, 8, 3))
DECODE_CANDIDATES = (DecodeConfig(),) + tuple(DecodeConfig(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                                               if DecodeConfig(n, w, s) != DecodeConfig())


DECODE_TUNING_S = 30  # seconds kept for the decode-attention tuning after the fused MoE's


def block_heights(key: int, shapes: Shapes) -> tuple[int, ...]:
    rows = key * shapes.top_k / shapes.experts  # pairs an expert
    if rows <= 8:
        return (16,)
    if rows <= 32:
        return (16, 32)
    if rows <= 64:
        return (32, 64)
    return (64, 128)


class Timer:
    """Median milliseconds of a call: ``triton.testing.do_bench`` on CUDA, one timed call on CPU (a smoke run)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------ inputs
def moe_inputs(n: int, s: Shapes, dtype: torch.dtype, dev: str, seed: int = 0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, s.hidden, device=dev, generator=gen).to(dtype)
    top_w, top_ids = torch.randn(n, s.experts, device=dev, generator=gen).softmax(-1).topk(s.top_k, dim=-1)
    gate_up = (torch.randn(s.experts, 2 * s.inter, s.hidden, device=dev, generator=gen) / s.hidden**0.5).to(dtype)
    down = (torch.randn(s.experts, s.hidden, s.inter, device=dev, generator=gen) / s.inter**0.5).to(dtype)
    return x, top_ids, (top_w / top_w.sum(-1, keepdim=True)).to(dtype), gate_up, down


def moe_reference(x, top_ids, top_w, gate_up, down) -> torch.Tensor:
    """fp32, one expert at a time over the tokens that picked it."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        token, slot = (top_ids == e).nonzero(as_tuple=True)
        if token.numel():
            gate, up = (x[token].float() @ gate_up[e].float().T).chunk(2, dim=-1)
            out.index_add_(0, token, (F.silu(gate) * up) @ down[e].float().T * top_w[token, slot, None].float())
    return out


def decode_inputs(batch: int, context: int, s: Shapes, dtype: torch.dtype, dev: str):
    """Slots laid out as the engine lays them out: each prompt contiguous, decode steps interleaved."""
    prompt = context // 2
    slots = batch * context + 1
    k_pool = torch.randn(slots, s.kv_heads, s.head_dim, device=dev, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(batch, s.heads, s.head_dim, device=dev, dtype=dtype)
    b = torch.arange(batch, device=dev)[:, None]
    t = torch.arange(context, device=dev)[None, :]
    table = torch.where(t < prompt, b * prompt + t, batch * prompt + (t - prompt) * batch + b) + 1
    lens = torch.full((batch,), context, device=dev, dtype=torch.int64)
    return q, k_pool, v_pool, table, lens


# ------------------------------------------------------------------------------------------ checks
def check_fused_moe(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> dict:
    from rollout.engine.models.layers import experts_grouped_mm

    out: dict = {"ok": True}
    for n in s.check_tokens:
        args = moe_inputs(n, s, dtype, dev, seed=n)
        rel = _rel_err(fused_experts(*args), moe_reference(*args))
        row = {"rel_err": rel, "fused_ms": timer(lambda: fused_experts(*args))}
        if dev == "cuda" and dtype == torch.bfloat16:
            row["grouped_mm_ms"] = timer(lambda: experts_grouped_mm(*args))
        out[str(n)] = row
        out["ok"] &= rel < (2e-2 if dtype != torch.float32 else 1e-4)
    return out


def check_decode_attention(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> dict:
    batch, context = s.decode_points[-1]
    q, k_pool, v_pool, table, lens = decode_inputs(batch, context, s, dtype, dev)
    rel = _rel_err(paged_decode_attention(q, k_pool, v_pool, table, lens),
                   paged_decode_attention_ref(q, k_pool, v_pool, table, lens))
    return {"ok": rel < 2e-2, "rel_err": rel, "ms": timer(lambda: paged_decode_attention(q, k_pool, v_pool, table, lens))}


def check_prefill_attention(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> dict:
    from rollout.engine.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

    q_lens, kv_lens = ([512, 512, 300, 40], [512, 700, 300, 90]) if s.hidden > 64 else ([9, 4], [9, 12])
    slots = sum(kv_lens) + 1
    k_pool = torch.randn(slots, s.kv_heads, s.head_dim, device=dev, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(sum(q_lens), s.heads, s.head_dim, device=dev, dtype=dtype)
    table = torch.zeros(len(kv_lens), max(kv_lens), dtype=torch.int64, device=dev)
    start = 1
    for row, n in enumerate(kv_lens):
        table[row, :n] = torch.arange(start, start + n, device=dev)
        start += n
    rows = torch.arange(len(kv_lens), device=dev)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=dev)
    lens = torch.tensor(kv_lens, device=dev)
    args = (q, k_pool, v_pool, table, rows, starts, lens)
    rel = _rel_err(paged_prefill_attention(*args, max(q_lens)), paged_prefill_attention_ref(*args))
    return {"ok": rel < 2e-2, "rel_err": rel, "ms": timer(lambda: paged_prefill_attention(*args, max(q_lens)))}


def check_layer_kernels(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer) -> dict:
    from rollout.engine.kernels.rms_norm import rms_norm as fused_rms_norm
    from rollout.engine.kernels.rope_kv import rope_qk_store_kv
    from rollout.engine.kernels.router_topk import router_topk
    from rollout.engine.models.layers import Rotary, rms_norm, route_topk

    n = s.check_tokens[1]
    x, res = torch.randn(n, s.hidden, device=dev, dtype=dtype), torch.randn(n, s.hidden, device=dev, dtype=dtype)
    w = torch.ones(s.hidden, device=dev, dtype=dtype)
    out = {}
    fused, summed = fused_rms_norm(x, w, 1e-6, res)
    out["rms_norm"] = {"rel_err": _rel_err(fused, rms_norm(res + x, w, 1e-6)), "sum_exact": bool(torch.equal(summed, res + x)),
                       "ms": timer(lambda: fused_rms_norm(x, w, 1e-6, res)),
                       "torch_ms": timer(lambda: rms_norm(res + x, w, 1e-6))}
    qkv = torch.randn(n, (s.heads + 2 * s.kv_heads) * s.head_dim, device=dev, dtype=dtype)
    norm = torch.ones(s.head_dim, device=dev, dtype=dtype)
    rotary = Rotary(s.head_dim, 1e6, 4096, torch.device(dev))
    pos = torch.randint(0, 4096, (n,), device=dev)
    loc = torch.randperm(4 * n, device=dev)[:n]
    k_pool = torch.zeros(4 * n, s.kv_heads, s.head_dim, device=dev, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)

    def fused_rope():
        return rope_qk_store_kv(qkv, s.heads, s.kv_heads, s.head_dim, norm, norm, 1e-6, rotary.cos, rotary.sin, pos,
                                k_pool, v_pool, loc)

    def torch_rope():
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q, k = rotary.apply(rms_norm(q.view(n, s.heads, -1), norm, 1e-6), rms_norm(k.view(n, s.kv_heads, -1), norm, 1e-6), pos)
        k_pool[loc], v_pool[loc] = k, v.view(n, s.kv_heads, -1)
        return q

    q_fused = fused_rope()
    k_fused = k_pool[loc].clone()
    q_ref = torch_rope()
    out["rope_kv"] = {"rel_err": max(_rel_err(q_fused, q_ref), _rel_err(k_fused, k_pool[loc])),
                      "ms": timer(fused_rope), "torch_ms": timer(torch_rope)}
    router = torch.randn(s.experts, s.hidden, device=dev, dtype=dtype) / s.hidden**0.5
    logits = F.linear(x, router)
    ids, weights = router_topk(logits, s.top_k, True, False)
    ref_ids, ref_w = route_topk(x, router, s.top_k, True, False)
    # a row's experts as a set: among experts of equal weight (common with bf16 logits) the order is free
    out["router_topk"] = {"id_agreement": (ids.long().sort(-1).values == ref_ids.sort(-1).values).all(-1).float().mean().item(),
                          "rel_err": _rel_err(weights, ref_w), "ms": timer(lambda: router_topk(logits, s.top_k, True, False)),
                          "torch_ms": timer(lambda: route_topk(x, router, s.top_k, True, False))}
    from rollout.engine.kernels.gumbel_sample import sample_tokens
    from rollout.engine.sampler import SamplingTensors, sample

    logits = torch.randn(n, s.vocab, device=dev, dtype=dtype) * 3
    temperature = torch.where(torch.arange(n, device=dev) % 4 == 0, 0.0, 0.8)
    seeds, positions = torch.arange(n, device=dev) * 7919, torch.arange(n, device=dev) + 100
    params = SamplingTensors(temperature=temperature, top_p=torch.full((n,), 2.0, device=dev),
                             top_k=torch.full((n,), s.vocab, device=dev), seeds=seeds, positions=positions,
                             needs_truncation=False, all_greedy=False)
    ids, lps = sample_tokens(logits, temperature, seeds, positions)
    ref_ids, ref_lps = sample(logits, params)  # the torch path
    same = ids == ref_ids
    out["sampler"] = {"id_agreement": same.float().mean().item(),
                      "logprob_max_err": (lps - ref_lps)[same].abs().max().item() if same.any() else float("inf"),
                      "ms": timer(lambda: sample_tokens(logits, temperature, seeds, positions)),
                      "torch_ms": timer(lambda: sample(logits, params))}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out["ok"] = (out["rms_norm"]["rel_err"] < tol and out["rms_norm"]["sum_exact"] and out["rope_kv"]["rel_err"] < tol
                 and out["router_topk"]["id_agreement"] > 0.99 and out["router_topk"]["rel_err"] < tol
                 and out["sampler"]["id_agreement"] > 0.99 and out["sampler"]["logprob_max_err"] < 1e-3)
    return out


CHECKS = {  # name -> (check, engine options that avoid the kernel)
    "fused_moe": (check_fused_moe, {"moe_backend": "grouped_mm"}),
    "decode_attention": (check_decode_attention, {"attention_backend": "torch", "prefill_attention_backend": "torch",
                                                  "cuda_graph": False}),
    "prefill_attention": (check_prefill_attention, {"prefill_attention_backend": "torch"}),
    "layer_kernels": (check_layer_kernels, {"layer_kernels": "torch"}),
}


# ------------------------------------------------------------------------------------------ tuning
def tune_moe(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer, deadline: float, quick: bool) -> tuple[dict, dict]:
    """(table {key: MoEConfig json}, report {key: timings}) for the keys reached before ``deadline``."""
    from rollout.engine.models.layers import experts_grouped_mm

    shape = MoEShape(s.experts, s.hidden, s.inter, s.top_k, str(dtype).removeprefix("torch."))
    ups = UP_CANDIDATES[:2] if quick else UP_CANDIDATES
    downs = DOWN_CANDIDATES[:2] if quick else DOWN_CANDIDATES
    table, report = {}, {}
    for key in s.moe_keys:
        if time.monotonic() > deadline:
            report[str(key)] = {"skipped": "budget spent"}
            continue
        args = moe_inputs(key, s, dtype, dev, seed=key)
        x, top_ids, top_w, gate_up, down = args
        best = None
        tried = []
        for bm in block_heights(key, s):
            layout = pair_layout(top_ids, s.experts, bm)
            layout_ms = timer(lambda: pair_layout(top_ids, s.experts, bm))
            up_times = _time_candidates(ups, "up", lambda c: (lambda: fused_moe.gate_up_act(x, gate_up, layout, s.top_k, c)),
                                        shape, timer, tried, f"bm={bm} up")
            if not up_times:
                continue
            up_cfg = min(up_times, key=up_times.get)
            act = fused_moe.gate_up_act(x, gate_up, layout, s.top_k, up_cfg)
            flat_w = top_w.reshape(-1)
            down_times = _time_candidates(downs, "down",
                                          lambda c: (lambda: fused_moe.down_weighted(act, down, flat_w, layout, c)),
                                          shape, timer, tried, f"bm={bm} down")
            if not down_times:
                continue
            down_cfg = min(down_times, key=down_times.get)
            total = layout_ms + up_times[up_cfg] + down_times[down_cfg]
            if best is None or total < best[0]:
                best = (total, MoEConfig(bm, up_cfg, down_cfg))
        if best is None:
            report[str(key)] = {"error": "no candidate compiled", "tried": tried}
            continue
        cfg = best[1]
        table[str(key)] = cfg.to_json()
        default = fused_moe.default_config(key, shape)
        active = int(torch.unique(top_ids).numel())
        weight_bytes = active * 3 * s.hidden * s.inter * torch.empty((), dtype=dtype).element_size()
        row = {"config": cfg.to_json(), "active_experts": active, "expert_weight_bytes": weight_bytes,
               "tuned_ms": timer(lambda: fused_experts(*args, config=cfg)),
               "default_ms": timer(lambda: fused_experts(*args, config=default)),
               "rel_err": _rel_err(fused_experts(*args, config=cfg), moe_reference(*args)), "failed": tried}
        if row["default_ms"] < row["tuned_ms"]:  # the stages timed apart can lose together: keep what runs faster
            row.update(config=default.to_json(), tuned_ms=row["default_ms"], kept_default=True)
            table[str(key)] = default.to_json()
        if dev == "cuda" and dtype == torch.bfloat16:
            row["grouped_mm_ms"] = timer(lambda: experts_grouped_mm(*args))
        row["tuned_TBps"] = weight_bytes / row["tuned_ms"] / 1e9
        report[str(key)] = row
        print(f"fused_moe key {key}: {row['config']} {row['tuned_ms']:.3f} ms (default {row['default_ms']:.3f}, grouped_mm "
              f"{row.get('grouped_mm_ms', float('nan')):.3f}) = {row['tuned_TBps']:.2f} TB/s on {active} experts", flush=True)
    return table, report


def _time_candidates(candidates, kind: str, make_fn, shape: MoEShape, timer: Timer, failed: list, label: str) -> dict:
    """Milliseconds of each candidate tile (fitted to the shape) of the ``kind`` ("up"/"down") GEMM."""
    times = {}
    for n, k, warps, stages in candidates:
        gemm = GemmConfig(n, k, warps, stages)
        fitted = fused_moe.fit(MoEConfig(16, gemm, gemm), shape)
        cfg = fitted.up if kind == "up" else fitted.down
        if cfg in times:
            continue
        try:
            times[cfg] = timer(make_fn(cfg))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: that candidate is skipped
            failed.append(f"{label} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return times


def tune_decode(s: Shapes, dtype: torch.dtype, dev: str, timer: Timer, deadline: float, quick: bool) -> tuple[dict | None, dict]:
    points = [decode_inputs(b, c, s, dtype, dev) for b, c in s.decode_points]
    report: dict = {"points": {}, "failed": []}
    totals = {}
    for cfg in DECODE_CANDIDATES[:3] if quick else DECODE_CANDIDATES:
        if time.monotonic() > deadline:
            report["skipped"] = "budget spent"
            break
        try:
            times = [timer(lambda p=p: paged_decode_attention(*p, config=cfg)) for p in points]
        except Exception as exc:  # noqa: BLE001
            report["failed"].append(f"{cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        totals[cfg] = sum(times)
        for (b, c), ms in zip(s.decode_points, times):
            kv_bytes = 2 * b * c * s.kv_heads * s.head_dim * torch.empty((), dtype=dtype).element_size()
            report["points"].setdefault(f"{b}x{c}", {})[str(asdict(cfg))] = {"ms": ms, "TBps": kv_bytes / ms / 1e9}
    if not totals:
        return None, report
    best = min(totals, key=totals.get)
    report["best"] = asdict(best)
    report["default"] = asdict(DecodeConfig())
    print(f"decode attention: best {best} (sum {totals[best]:.3f} ms; default {totals.get(DecodeConfig(), float('nan')):.3f})",
          flush=True)
    return asdict(best), report


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU interpreter): a smoke run of every path")
    p.add_argument("--budget-s", type=float, default=240.0, help="wall seconds for the whole stage (tuning stops early)")
    p.add_argument("--no-tune", action="store_true", help="checks only")
    p.add_argument("--tune-dir", help="write the tuned tables here (the engine reads them via R3_KERNEL_CONFIG_DIR)")
    p.add_argument("--fallbacks", help="write the engine options that avoid failed kernels here (JSON)")
    p.add_argument("--json", help="the full report")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    cuda = torch.cuda.is_available() and not args.quick
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # the CPU interpreter miscomputes bf16 dots
    shapes = QUICK if args.quick or not cuda else Shapes()
    timer = Timer(cuda)
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "shapes": asdict(shapes),
                    "checks": {}, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fallbacks: dict = {}

    def save() -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2, default=str))
        if args.fallbacks:
            atomic_write_text(args.fallbacks, json.dumps(fallbacks, indent=2))

    for name, (check, avoid) in CHECKS.items():
        try:
            result = check(shapes, dtype, dev, timer)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a finding, not a crash
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        report["checks"][name] = result
        if not result["ok"]:
            fallbacks.update(avoid)
        print(f"check {name}: {'ok' if result['ok'] else 'FAILED'} "
              f"{ {k: v for k, v in result.items() if k not in ('trace', 'ok')} }", flush=True)
        save()
    if not args.no_tune:
        tune_dir = Path(args.tune_dir) if args.tune_dir else None
        device = device_tag(torch.device(dev))
        if report["checks"]["fused_moe"]["ok"]:
            moe_deadline = deadline - (0 if args.quick else DECODE_TUNING_S)  # leave the decode tuning its share
            table, report["moe_tuning"] = tune_moe(shapes, dtype, dev, timer, moe_deadline, args.quick)
            if table and tune_dir is not None:
                shape = MoEShape(shapes.experts, shapes.hidden, shapes.inter, shapes.top_k, str(dtype).removeprefix("torch."))
                atomic_write_text(tune_dir / shape.file_name(device), json.dumps(table, indent=2))
            save()
        if report["checks"]["decode_attention"]["ok"]:
            best, report["decode_tuning"] = tune_decode(shapes, dtype, dev, timer, deadline, args.quick)
            if best is not None and tune_dir is not None:
                name = config_file_name(shapes.head_dim, shapes.heads // shapes.kv_heads, dtype, device)
                atomic_write_text(tune_dir / name, json.dumps(best, indent=2))
            save()
    print("\nkernel checks: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in report["checks"].items()))
    print(f"engine fallbacks: {fallbacks or 'none'}")
    for key, row in (report.get("moe_tuning") or {}).items():
        if "tuned_ms" in row:
            print(f"fused_moe {key:>5} tokens: tuned {row['tuned_ms']:.3f} ms ({row['tuned_TBps']:.2f} TB/s), default "
                  f"{row['default_ms']:.3f} ms, grouped_mm {row.get('grouped_mm_ms', float('nan')):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
