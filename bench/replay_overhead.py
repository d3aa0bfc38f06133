"""Overhead of R3 replay (and R2 record) on a transformers MoE forward+backward.

Each timed step is one forward and one backward of a next-token cross-entropy
loss over ``--batch x --seq`` random tokens, with the device synchronised on
both sides. Modes run interleaved (native, replay, replay without guard,
record, native, ...) so that drift and noisy neighbours hit every mode alike;
the table reports the median step time and its ratio to native. Replayed
routes are the model's own routes recorded beforehand, as correct rollout
routes would be, so the guard passes and routing work is the same as native.

CPU: ``python -m bench.replay_overhead``
GPU: ``OUT=$OUT python -m bench.replay_overhead --device cuda --preset bench-qwen3-moe --batch 4 --seq 2048``
(the JSON also goes to ``$OUT/replay_overhead.json`` when ``OUT`` is set)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from rollout.presets import PRESETS, make_config
from trainer_bridge import record, replay

MODES = ("native", "replay", "replay_guard_off", "record")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Random weights made on the device itself (no checkpoint on disk), or a given checkpoint."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    else:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(make_config(args.preset), dtype=dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model: torch.nn.Module, input_ids: torch.Tensor, context: Callable[[], ContextManager]) -> None:
    with context():
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        loss.backward()
    model.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> dict:
    model = build_model(args)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=None)
    with torch.no_grad(), record(model) as recording:
        model(input_ids=input_ids)
    routes = recording.routes
    contexts: dict[str, Callable[[], ContextManager]] = {
        "native": nullcontext,
        "replay": lambda: replay(model, routes, guard="warn"),
        "replay_guard_off": lambda: replay(model, routes, guard="off"),
        "record": lambda: record(model),
    }
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(args.warmup + args.iters):
        for mode in MODES:
            sync(args.device)
            start = time.perf_counter()
            step(model, input_ids, contexts[mode])
            sync(args.device)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    median = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "bench": "replay_overhead",
        "device": device,
        "model": args.model or args.preset,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "checkpointing": args.checkpointing,
        "iters": args.iters,
        "median_ms": {m: round(v, 3) for m, v in median.items()},
        "ratio_to_native": {m: round(v / median["native"], 4) for m, v in median.items()},
        "min_ms": {m: round(min(t) * 1e3, 3) for m, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-qwen3-moe", choices=sorted(PRESETS))
    parser.add_argument("--model", default=None, help="an HF checkpoint directory instead of a preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    result = run(args)
    print(f"replay overhead: {result['model']} {result['dtype']} on {result['device']}, "
          f"batch {args.batch} x seq {args.seq}, checkpointing={args.checkpointing}, median of {args.iters}")
    print(f"{'mode':<18} {'fwd+bwd ms':>12} {'min ms':>10} {'x native':>9}")
    for mode in MODES:
        print(f"{mode:<18} {result['median_ms'][mode]:>12.2f} {result['min_ms'][mode]:>10.2f} {result['ratio_to_native'][mode]:>9.3f}")
    print(json.dumps(result))
    if os.environ.get("OUT"):  # the GPU runner collects files under $OUT
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "replay_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
