"""``update_weights`` on the GPU: the updated engine against a fresh engine loaded from the new checkpoint.

``python -m bench.weight_update_check [--out DIR]`` (default ``$OUT``). For each family the
built-in engine runs, two random checkpoints (seed 0 = old weights, seed 1 = new) are made;
an engine on the old one generates (which fills its prefix cache and, with CUDA graphs,
captures them), takes the new weights from a transformers model's ``state_dict`` (fp32, on the
GPU) through ``update_weights``, and generates again, the same prompts and their extensions.
A fresh engine on the new checkpoint is the reference. Configurations:

* fp32, torch attention, no graphs: logprobs must agree within 1e-6;
* bf16, Triton paged attention, CUDA graphs (captured *before* the update): tokens, routes and
  logprobs must be identical, and graph replays must have served the decode steps.

Writes ``weight_update_check.json`` and prints a table; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rollout.atomic import atomic_write_text

PROMPTS = [[5, 17, 300, 42, 7, 99, 123, 4], [250, 11, 3, 480, 9], list(range(1, 40)), [7] * 20]
CONFIGS = {
    "fp32-eager": dict(dtype="float32", tol=1e-6, options={}),
    "bf16-graphs": dict(dtype="bfloat16", tol=0.0, options=dict(attention_backend="triton", cuda_graph=True)),
}
SIZES = dict(kv_slots=4096, max_running_requests=16, max_batch_tokens=1024)


def _run(engine):
    from rollout.types import SamplingParams

    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    sampled = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=i) for i in range(len(PROMPTS))]
    first = engine.generate(PROMPTS, greedy) + engine.generate(PROMPTS, sampled)
    return first + engine.generate([r.token_ids for r in first[: len(PROMPTS)]], greedy)


def _compare(got, want) -> dict:
    tokens = all(g.output_ids == w.output_ids for g, w in zip(got, want))
    routes = all(np.array_equal(g.routed_experts.ids, w.routed_experts.ids) for g, w in zip(got, want))
    diff = max(float(np.abs(np.asarray(g.output_logprobs) - np.asarray(w.output_logprobs)).max())
               for g, w in zip(got, want) if g.output_ids == w.output_ids) if tokens else None
    return {"tokens_equal": tokens, "routes_equal": routes, "max_abs_logprob_diff": diff}


def check(preset: str, config: str, root: Path, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    from rollout.engine.engine import Engine
    from rollout.presets import init_model

    spec = CONFIGS[config]
    old, new = (root / f"{preset}-{s}" for s in (0, 1))
    for seed, path in ((0, old), (1, new)):
        if not path.exists():
            init_model(preset, path, seed=seed)
    options = dict(device=device, dtype=spec["dtype"], **SIZES, **spec["options"])
    engine = Engine(old, **options)
    before = _run(engine)
    trainer = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).to(device)
    replays_before = engine.graphs.replays if engine.graphs is not None else 0
    _sync(device)
    start = time.perf_counter()
    engine.update_weights(trainer.state_dict(), version=1)
    _sync(device)
    seconds = time.perf_counter() - start
    got = _run(engine)
    graph_replays = (engine.graphs.replays - replays_before) if engine.graphs is not None else 0
    del trainer
    want = _run(Engine(new, **options))
    result = {"preset": preset, "config": config, "update_seconds": seconds, "graph_replays_after_update": graph_replays,
              **_compare(got, want),
              "changed": any(b.output_ids != g.output_ids for b, g in zip(before, got)),
              "versions": sorted({str(r.weight_version) for r in got})}
    diff = result["max_abs_logprob_diff"]
    result["ok"] = bool(result["tokens_equal"] and result["routes_equal"] and diff is not None
                        and diff <= spec["tol"] and result["changed"] and result["versions"] == ["1"]
                        and (graph_replays > 0 or not spec["options"].get("cuda_graph")))
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for weight_update_check.json")
    p.add_argument("--presets", default="tiny-qwen3-moe,tiny-qwen2-moe,tiny-mixtral")
    p.add_argument("--device", default="cuda", help="cpu runs the configurations without CUDA graphs (a smoke test)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("weight_update_check: CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    configs = [c for c, spec in CONFIGS.items() if args.device.startswith("cuda") or not spec["options"]]
    results = []
    with tempfile.TemporaryDirectory(prefix="r3-weights-") as tmp:
        for preset in args.presets.split(","):
            for config in configs:
                try:
                    results.append(check(preset, config, Path(tmp), args.device))
                except Exception as exc:  # report and go on: one broken configuration must not hide the others
                    results.append({"preset": preset, "config": config, "ok": False, "error": repr(exc)})
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    summary = {"device": name, "torch": torch.__version__, "results": results,
               "ok": all(r["ok"] for r in results)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "weight_update_check.json", json.dumps(summary, indent=2) + "\n")
    print(f"{'preset':16} {'config':12} {'tokens':6} {'routes':6} {'max|dlogp|':>11} {'graphs':>6} {'update s':>8}  ok")
    for r in results:
        if "error" in r:
            print(f"{r['preset']:16} {r['config']:12} ERROR {r['error'][:80]}")
            continue
        diff = "-" if r["max_abs_logprob_diff"] is None else f"{r['max_abs_logprob_diff']:.2e}"
        print(f"{r['preset']:16} {r['config']:12} {str(r['tokens_equal']):6} {str(r['routes_equal']):6} {diff:>11} "
              f"{r['graph_replays_after_update']:>6} {r['update_seconds']:>8.4f}  {r['ok']}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
