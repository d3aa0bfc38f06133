"""Colocation on one GPU: what ``release_memory`` frees and what ``release``/``resume``/``update_weights`` cost.

``python -m bench.colocate --model DIR [--cycles 3] [--out DIR]`` (default ``$MODEL`` and ``$OUT``).
The engine runs as the GPU recipe runs it (bf16, overlap on, with ``--graphs`` Triton paged
attention and CUDA graphs). Per cycle, for ``weights=False`` (KV pool only) and ``weights=True``
(KV pool and weights to pinned host memory):

* ``release`` / ``resume`` wall time (device synchronised), and the device memory each frees
  or takes back (``torch.cuda.memory_allocated`` and the driver's free memory);
* after every resume, greedy generation must equal the first one (tokens, routes, logprobs).

Then ``update_weights`` of the whole model from the checkpoint's tensors, three ways: from
host memory, from device memory (a trainer on the same GPU), and while the weights sit on the
host (written into the pinned copies, uploaded by ``resume``). Prediction before measuring
(H200, ~16 GB of bf16 weights): device-to-device ~10-20 ms at ~1-3 TB/s; host-to-device from
pageable memory ~1-3 s; the offload and upload ~1 s each way over PCIe 5 from pinned buffers
(the first offload also pins 16 GB, which costs seconds); KV release and resume in milliseconds
plus the CUDA-graph recapture (seconds for the 12-layer model).

Writes ``colocate.json`` and prints a table; exit status 1 if a resumed engine answers differently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rollout.atomic import atomic_write_text
from rollout.engine.models.loader import read_checkpoint_tensors

GiB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"allocated_gib": 0.0, "driver_free_gib": 0.0}
    return {"allocated_gib": torch.cuda.memory_allocated(device) / GiB,
            "driver_free_gib": torch.cuda.mem_get_info(device)[0] / GiB}


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _generate(engine, prompts):
    from rollout.types import SamplingParams

    return engine.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0))


def _same(a, b) -> bool:
    return all(x.output_ids == y.output_ids and x.output_logprobs == y.output_logprobs
               and np.array_equal(x.routed_experts.ids, y.routed_experts.ids) for x, y in zip(a, b))



def run(args: argparse.Namespace) -> dict:
    from rollout.engine.engine import Engine
    from rollout.engine.weights import weight_bytes

    device = torch.device(args.device)
    options = dict(device=args.device, dtype=args.dtype, kv_slots=args.kv_slots, max_running_requests=64,
                   max_batch_tokens=8192)
    if args.graphs:
        options.update(attention_backend="triton", cuda_graph=True)
    load = time.perf_counter()
    engine = Engine(args.model, **options)
    load = time.perf_counter() - load
    prompts = np.random.default_rng(0).integers(0, engine.model.arch.vocab_size, size=(args.batch, 64)).tolist()
    reference = _generate(engine, prompts)
    resident = _memory(device)
    result: dict = {"model": str(args.model), "options": options, "engine_load_seconds": load,
                    "weight_gib": weight_bytes(engine.model.weights) / GiB,
                    "kv_gib": 2 * engine.kv.k.numel() * engine.kv.k.element_size() / GiB,
                    "resident": resident, "cycles": []}
    ok = True
    for cycle in range(args.cycles):
        for weights in (False, True):
            row = {"cycle": cycle, "weights": weights}
            row["release_seconds"] = _timed(device, lambda: engine.release_memory(weights=weights))
            row["released"] = _memory(device)
            row["resume_seconds"] = _timed(device, engine.resume_memory)
            row["resumed"] = _memory(device)
            row["same_outputs_after_resume"] = _same(_generate(engine, prompts), reference)
            ok &= row["same_outputs_after_resume"]
            result["cycles"].append(row)
    if args.graphs:
        result["graph_capture_seconds"] = _timed(device, lambda: setattr(engine, "graphs", engine._make_graphs()))
    host = read_checkpoint_tensors(args.model)
    result["update_from_host_seconds"] = _timed(device, lambda: engine.update_weights(host, version=1))
    on_device = {k: v.to(device) for k, v in host.items()}
    host.clear()  # 16 GB of host memory back before the next copies
    result["update_from_device_seconds"] = _timed(device, lambda: engine.update_weights(on_device, version=2))
    engine.release_memory(weights=True)
    result["update_while_on_host_seconds"] = _timed(device, lambda: engine.update_weights(on_device, version=3))
    result["resume_after_update_seconds"] = _timed(device, engine.resume_memory)
    result["same_outputs_after_updates"] = _same(_generate(engine, prompts), reference)  # the same weights, 3 times
    ok &= result["same_outputs_after_updates"]
    result["ok"] = bool(ok)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("MODEL", "/tmp/bench-qwen3-moe"), help="checkpoint directory")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="Triton paged attention + CUDA graphs (CUDA only)")
    p.add_argument("--kv-slots", type=int, default=65536)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cycles", type=int, default=3)
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"colocate: no checkpoint at {args.model} (make one: r3 init-model --preset bench-qwen3-moe "
              f"--out {args.model} --device cuda)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        args.graphs = False
    result = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "colocate.json", json.dumps(result, indent=2) + "\n")
    print(f"weights {result['weight_gib']:.2f} GiB, KV pool {result['kv_gib']:.2f} GiB, "
          f"allocated when resident {result['resident']['allocated_gib']:.2f} GiB")
    print(f"{'cycle':>5} {'weights':>7} {'release s':>9} {'alloc after':>11} {'resume s':>8} {'alloc after':>11} same")
    for r in result["cycles"]:
        print(f"{r['cycle']:>5} {str(r['weights']):>7} {r['release_seconds']:>9.3f} {r['released']['allocated_gib']:>11.2f} "
              f"{r['resume_seconds']:>8.3f} {r['resumed']['allocated_gib']:>11.2f} {r['same_outputs_after_resume']}")
    for key in ("graph_capture_seconds", "update_from_host_seconds", "update_from_device_seconds",
                "update_while_on_host_seconds", "resume_after_update_seconds"):
        if key in result:
            print(f"{key:32} {result[key]:.3f}")
    print(f"same outputs after the updates: {result['same_outputs_after_updates']}; ok: {result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
