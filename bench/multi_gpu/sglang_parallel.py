"""Issue 17 (1): SGLang tensor and expert parallel with routed experts, against one GPU and the built-in engine.

For each configuration (default: ``tp1`` = one GPU, ``tp2`` = ``tp_size=2``, ``tp2-ep2`` =
``tp_size=2 ep_size=2``; SGLang 0.5.17's expert-parallel option is ``ep_size``, on the server
``--ep-size``/``--expert-parallel-size``) one SGLang engine (``sglang_routes_worker.py``, in the
SGLang environment) decodes the same prompts greedily with ``return_routed_experts``, then
prefills the same fixed sequences (``tp1``'s prompts + outputs) to get routes on identical tokens.
This script (project environment, the image's torch) then checks:

* routes decode (``RoutedExperts.from_sglang``) and have ``len(prompt) + len(output) - 1`` rows;
* teacher-forced agreement: share of ``(token, MoE layer)`` rows whose expert set equals ``tp1``'s,
  and the built-in engine's (``RolloutWorker``, bf16, same GPU type) on the same tokens;
* greedy decode: share of output tokens equal to ``tp1``'s, and route agreement on the tokens both produced;
* decode throughput with routes on (same engine), and with ``--routes-off`` a second engine per
  configuration started without route capture (``bench/sglang_offline.py``).

Usage: ``python3 bench/multi_gpu/sglang_parallel.py --model DIR --out $OUT [--configs NAME:K=V,K=V ...]``.
The model is made with ``rollout.presets.init_model('bench-qwen3-moe')`` when DIR has none.
Writes ``$OUT/sglang_parallel.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from rollout.moe_spec import MoESpec  # noqa: E402
from rollout.routed_experts import RoutedExperts  # noqa: E402

WORKER = REPO / "bench" / "multi_gpu" / "sglang_routes_worker.py"
OFFLINE = REPO / "bench" / "sglang_offline.py"
SGLANG_SITE = "/tmp/sglang-site"
DEFAULT_CONFIGS = ("tp1:tp_size=1", "tp2:tp_size=2", "tp2-ep2:tp_size=2,ep_size=2")
BASELINE = "tp1"


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, opts = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"config {text!r} is not NAME:KEY=VALUE,KEY=VALUE")
    return name, [o for o in opts.split(",") if o]


def sglang_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=SGLANG_SITE, PYTHONUNBUFFERED="1")
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


def run_worker(model: str, job: dict, options: list[str], out: Path, timeout: float) -> dict:
    job_file, result_file = out.with_suffix(".job.json"), out.with_suffix(".result.json")
    job_file.write_text(json.dumps(job))
    cmd = [sys.executable, str(WORKER), "--model", model, "--job", str(job_file), "--out", str(result_file)]
    cmd += [a for o in options for a in ("--option", o)]
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=sglang_env(), timeout=timeout).returncode
    if rc != 0 or not result_file.is_file():
        raise RuntimeError(f"SGLang worker exited {rc}; see {out.with_suffix('.log')}")
    return json.loads(result_file.read_text())


def decode(b64: str | None, spec: MoESpec, rows: int) -> np.ndarray:
    """``[rows, num_moe_layers, top_k]`` ids, or a ``ValueError`` saying what is wrong."""
    if b64 is None:
        raise ValueError("reply has no routed_experts")
    routes = RoutedExperts.from_sglang(
        b64, num_experts=spec.num_experts, num_hidden_layers=spec.num_hidden_layers, top_k=spec.top_k,
        moe_layers=spec.moe_layers,
    )  # fmt: skip
    if routes.ids.shape[0] != rows:
        raise ValueError(f"routes have {routes.ids.shape[0]} rows, expected {rows}")
    return routes.ids.astype(np.int64)


def set_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of (token, layer) rows with the same expert set."""
    return float((np.sort(a, -1) == np.sort(b, -1)).all(-1).mean())


def builtin_forced_routes(model: str, forced: list[list[int]], spec: MoESpec) -> list[np.ndarray]:
    from rollout import RolloutWorker, SamplingParams

    with RolloutWorker(model, device="cuda", dtype="bfloat16", overlap=True) as worker:
        outs = worker.generate(forced, SamplingParams(max_new_tokens=1, temperature=0.0))
    return [o.routed_experts.ids[: len(seq)].astype(np.int64) for o, seq in zip(outs, forced)]


def offline_throughput(model: str, options: list[str], prompts: list[list[int]], new_tokens: int, out: Path, timeout: float) -> float | None:
    """Decode tok/s of an engine started without route capture (bench/sglang_offline.py)."""
    prompts_file = out.with_suffix(".offline-prompts.json")
    prompts_file.write_text(json.dumps({str(len(prompts)): {"timed": prompts, "warmup": prompts[:2]}}))
    cmd = [sys.executable, str(OFFLINE), "--model", model, "--prompts", str(prompts_file), "--new-tokens", str(new_tokens),
           "--temperature", "0", "--routes", "off", "--overlap", "on"] + [a for o in options for a in ("--option", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=sglang_env(), timeout=timeout)
    out.with_suffix(".offline.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])[0]["tok_s"]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--routes-off", action="store_true", help="also time each configuration without route capture")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per engine")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model) / "config.json").is_file():
        from rollout.presets import init_model

        init_model("bench-qwen3-moe", args.model, seed=0, dtype="bfloat16", device="cuda")
    spec = MoESpec.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 151936, size=(args.prompts, args.prompt_len)).tolist()

    configs = dict(args.configs)
    if BASELINE not in configs:
        raise SystemExit(f"the configurations must include {BASELINE!r}, the one-GPU baseline")
    order = [BASELINE] + [c for c in configs if c != BASELINE]
    results: dict[str, dict] = {}
    forced: list[list[int]] = []
    for name in order:
        t0 = time.perf_counter()
        entry: dict = {"options": configs[name]}
        try:
            job = {"prompts": prompts, "forced": forced or None, "new_tokens": args.new_tokens}
            raw = run_worker(args.model, job, configs[name], out / f"sglang-{name}", args.timeout)
            outputs = [d["output_ids"] for d in raw["decode"]]
            if name == BASELINE:
                forced = [d["input_ids"] for d in raw["forced"]]
            entry["decode_routes"] = [decode(d["routed_experts"], spec, len(pr) + len(o) - 1)
                                      for d, pr, o in zip(raw["decode"], prompts, outputs)]
            entry["forced_routes"] = [decode(d["routed_experts"], spec, len(seq)) for d, seq in zip(raw["forced"], forced)]
            entry["outputs"] = outputs
            tokens = sum(len(o) for o in outputs)
            entry.update(engine_seconds=raw["engine_seconds"], decode_tok_s_routes_on=tokens / raw["decode_seconds"])
            if args.routes_off:
                entry["decode_tok_s_routes_off"] = offline_throughput(
                    args.model, configs[name], prompts, args.new_tokens, out / f"sglang-{name}", args.timeout
                )
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            entry["error"] = str(exc)
        entry["seconds"] = time.perf_counter() - t0
        results[name] = entry

    base = results[BASELINE]
    if "error" not in base:
        builtin = builtin_forced_routes(args.model, forced, spec)
        for name, entry in results.items():
            if "error" in entry:
                continue
            entry["forced_agreement_vs_tp1"] = float(np.mean([set_agreement(a, b) for a, b in zip(entry["forced_routes"], base["forced_routes"])]))
            entry["forced_agreement_vs_builtin"] = float(np.mean([set_agreement(a, b) for a, b in zip(entry["forced_routes"], builtin)]))
            same = [np.mean(np.array(o) == np.array(b)) for o, b in zip(entry["outputs"], base["outputs"])]
            entry["greedy_tokens_equal_tp1"] = float(np.mean(same))
    summary = {
        name: {k: v for k, v in e.items() if k not in ("decode_routes", "forced_routes", "outputs")}
        for name, e in results.items()
    }
    summary["_setup"] = {"model": args.model, "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "spec": {"layers": spec.num_hidden_layers, "experts": spec.num_experts, "top_k": spec.top_k}}
    (out / "sglang_parallel.json").write_text(json.dumps(summary, indent=1))
    print("| config | forced agree vs tp1 | vs built-in | greedy tokens = tp1 | tok/s routes on | tok/s off | error |")
    print("|---|---|---|---|---|---|---|")
    for name, e in summary.items():
        if name.startswith("_"):
            continue
        cells = [e.get(k) for k in ("forced_agreement_vs_tp1", "forced_agreement_vs_builtin", "greedy_tokens_equal_tp1",
                                    "decode_tok_s_routes_on", "decode_tok_s_routes_off")]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" if c < 10 else f"{c:,.0f}" for c in cells)
              + f" | {e.get('error', '')} |")
    return 0 if all("error" not in e for n, e in summary.items() if not n.startswith("_")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
