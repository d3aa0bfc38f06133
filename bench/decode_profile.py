"""Where a decode step's time goes: per-kernel times of the built-in engine's steady decode, beside the step's floor.

For each ``BATCHxCONTEXT`` point, ``BATCH`` requests with ``CONTEXT``-token prompts are prefilled,
then the engine's own loop (``Engine.step``: schedule, launch, process; CUDA graphs and overlap as
configured) runs decode steps: a few to warm up, ``--steps`` timed with the device synchronised at
both ends, and ``--steps`` more under ``torch.profiler``. Kernels are grouped by what they do (fused
MoE, attention, dense GEMMs, norms, sampling, ...); each group's time a step is set beside the
step's wall time and its floor (``bench.roofline``: weights used + KV read + logits, over the copy
bandwidth measured here).

GPU: ``python -m bench.decode_profile --model /tmp/bench-qwen3-moe --point 256x1280 512x1024 --json $OUT/profile.json``
CPU smoke run: ``python -m bench.decode_profile --quick``
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench.roofline import copy_bandwidth, device_name, model_bytes
from bench.sglang_offline import parse_option
from rollout.atomic import atomic_write_text

WARMUP_STEPS = 3
MIN_TRACED_LAUNCHES = 50  # fewer kernels a step than this under graphs: the replays were not traced
# (group, kernel-name pattern), first match wins
GROUPS = (
    ("moe_gate_up", r"_gate_up_kernel"),
    ("moe_down", r"_down_kernel"),
    ("moe_layout", r"_rank_kernel|_offsets_kernel|_scatter_kernel"),
    ("reductions", r"reduce_kernel"),  # the top-k sum, argmax
    ("attention_decode", r"_decode_kernel"),
    ("attention_prefill", r"_prefill_kernel"),
    ("rope_kv", r"_rope_kv_kernel"),
    ("rms_norm", r"_rms_norm_kernel"),
    ("router_topk", r"_router_kernel"),
    ("sampling", r"_gumbel|softmax|log_softmax|argmax"),
    ("grouped_mm", r"grouped|GroupedGemm"),
    ("dense_gemm", r"gemm|gemv|cutlass|sm90_|nvjet|cublas|splitK|Kernel2"),
    ("copies", r"[Cc]opy|memcpy|memset|fill"),
)


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), "other")


def profile_point(engine, vocab: int, batch: int, context: int, steps: int, seed: int) -> dict:
    from rollout.types import SamplingParams

    device = engine.device
    cuda = device.type == "cuda"
    rng = np.random.default_rng([seed, batch, context])
    prompts = rng.integers(0, vocab, size=(batch, context)).tolist()
    sampling = SamplingParams(max_new_tokens=WARMUP_STEPS + 2 * steps + 2, temperature=1.0, seed=seed)
    base = engine.stats["computed_tokens"]
    for prompt in prompts:
        engine.add_request(prompt, sampling)
    while engine.stats["computed_tokens"] < base + batch * context:  # prefill runs first for every request
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_unfinished():
        engine.step()
    kernels: dict[str, dict] = defaultdict(lambda: {"ms_per_step": 0.0, "calls_per_step": 0.0})
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:  # a kernel (graph replays included)
            us = event.time_range.elapsed_us()
        elif not cuda and event.name.startswith("aten::"):  # the smoke run: CPU ops stand in for kernels
            us = event.self_cpu_time_total
        else:
            continue
        kernels[event.name]["ms_per_step"] += us / 1e3 / steps
        kernels[event.name]["calls_per_step"] += 1 / steps
    groups: dict[str, float] = defaultdict(float)
    for name, k in kernels.items():
        groups[group_of(name)] += k["ms_per_step"]
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_step"])[:20]
    return {"step_ms": step_ms, "kernel_ms_per_step": sum(k["ms_per_step"] for k in kernels.values()),
            "kernel_launches_per_step": sum(k["calls_per_step"] for k in kernels.values()),
            "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_kernels": {name: k for name, k in top}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default with --quick: a fresh tiny-qwen3-moe)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny model")
    p.add_argument("--point", nargs="+", help="BATCHxCONTEXT decode points (default 256x1280 512x1024)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-option", type=parse_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    args = p.parse_args(argv)
    points = args.point or (["4x16"] if args.quick else ["256x1280", "512x1024"])
    try:
        points = [tuple(int(v) for v in re.fullmatch(r"(\d+)x(\d+)", pt).groups()) for pt in points]
    except (AttributeError, ValueError):
        p.error(f"points must be BATCHxCONTEXT, got {points}")
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            if not args.quick:
                p.error("--model is required without --quick")
            from rollout.presets import init_model

            model = init_model("tiny-qwen3-moe", Path(tmp) / "m")
        return _run(model, points, device, args)


def _run(model, points, device: str, args) -> int:
    from rollout.engine.engine import Engine
    from rollout.moe_spec import read_config

    bandwidth = copy_bandwidth(device)
    mb = model_bytes(model)
    vocab = read_config(model)["vocab_size"]
    report = {"device": device_name(device), "model": str(model), "copy_bandwidth_Bps": bandwidth, "points": {}}
    options = dict(args.engine_option)
    engine = Engine(model, device=device, **options)
    report["config"] = dict(vars(engine.config))
    for batch, context in points:
        result = profile_point(engine, vocab, batch, context, args.steps, args.seed)
        if engine.graphs is not None and result["kernel_launches_per_step"] < MIN_TRACED_LAUNCHES:
            # this profiler did not trace the kernels inside graph replays: the same step without graphs shows them
            print(f"{batch}x{context}: {result['kernel_launches_per_step']:.0f} kernels traced a step with CUDA graphs; "
                  "profiling the same step eagerly", flush=True)
            engine.close()
            engine = Engine(model, device=device, **{**options, "cuda_graph": False})
            eager = profile_point(engine, vocab, batch, context, args.steps, args.seed)
            result = {**eager, "step_ms": result["step_ms"], "eager_step_ms": eager["step_ms"], "profiled": "eager"}
        floor_bytes = mb.decode_step_bytes(batch, context)
        result["floor_ms"] = floor_bytes / bandwidth * 1e3
        result["floor_bytes"] = {"weights": mb.step_weight_bytes(batch), "kv": batch * context * mb.kv_bytes_per_token,
                                 "logits": floor_bytes - mb.step_weight_bytes(batch) - batch * context * mb.kv_bytes_per_token}
        report["points"][f"{batch}x{context}"] = result
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=2, default=str))
        print(f"{batch}x{context}: step {result['step_ms']:.2f} ms, kernels {result['kernel_ms_per_step']:.2f} ms in "
              f"{result['kernel_launches_per_step']:.0f} launches, floor {result['floor_ms']:.2f} ms", flush=True)
    engine.close()
    print(f"\nper decode step (ms) at {bandwidth / 1e12:.2f} TB/s copy bandwidth")
    names = list(report["points"])
    groups = sorted({g for r in report["points"].values() for g in r["groups_ms_per_step"]},
                    key=lambda g: -max(r["groups_ms_per_step"].get(g, 0) for r in report["points"].values()))
    print(f"{'':<20}" + "".join(f"{n:>12}" for n in names))
    for label, key in (("step (wall)", "step_ms"), ("kernels (sum)", "kernel_ms_per_step"), ("floor", "floor_ms")):
        print(f"{label:<20}" + "".join(f"{report['points'][n][key]:>12.2f}" for n in names))
    for g in groups:
        print(f"  {g:<18}" + "".join(f"{report['points'][n]['groups_ms_per_step'].get(g, 0):>12.3f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
