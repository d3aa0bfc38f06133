"""Rollout throughput: the built-in engine against transformers ``generate`` and real SGLang, same checkpoint.

One table, one column pair per batch size: output tok/s and its share of the
decode roofline measured on the same device in the same run (``bench.roofline``).

**tok/s = generated tokens / wall time of the whole generate call**, prefill
included, timed from the call to its return with the device synchronised on both
sides. Prompts are random token ids (the same ones for every engine), every
request runs to ``--new-tokens`` (no stop tokens: the ``ignore_eos`` setting),
and each engine first runs an untimed warm-up batch of the same size on other
prompts, so one-off costs (CUDA graph capture, autotuning, allocator growth)
stay out of the figure while no prompt is served from a prefix cache. The built-in
engine gets a KV pool that holds every warm-up and timed sequence at once (unless
``--engine-option kv_slots=N``), so no timed call pays for prefix-cache eviction.

GPU: ``python -m bench.rollout_throughput --model /tmp/bench-qwen3-moe --sglang --json $OUT/throughput.json``
CPU smoke test: ``python -m bench.rollout_throughput --quick``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.sglang_offline import RESULT_PREFIX, parse_option
from bench.roofline import checkpoint_weight_bytes, copy_bandwidth, decode_roofline_tok_s, device_name
from rollout.atomic import atomic_write_text
from rollout.engine.config import DTYPES
from rollout.moe_spec import read_config

QUICK_PRESET = "tiny-qwen3-moe"
MIN_KV_SLOTS = 65536  # the engine's default pool
WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts never share a prefix with timed ones
BUILTIN_MODES = ((False, True), (True, True), (True, False), (False, False))  # (routes, overlap), issue 8's order
SGLANG_MODES = ((True, True), (False, True), (True, False))


@dataclass
class Measurement:
    engine: str  # "builtin", "transformers" or "sglang"
    routes: bool | None  # None: the engine cannot capture routes
    overlap: bool | None
    batch: int
    tokens: int
    seconds: float
    tok_s: float
    roofline_share: float | None = None
    note: str = ""
    stats: dict | None = None  # the built-in engine's counters after the timed call


def make_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Random token ids; the seed includes the batch so runs of different sizes share no prefix."""
    rng = np.random.default_rng(seed + batch)
    return rng.integers(0, vocab_size, size=(batch, prompt_len)).tolist()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], int], device: str) -> tuple[int, float]:
    """(tokens generated, wall seconds) of one call, device idle before and after."""
    _sync(device)
    t0 = time.perf_counter()
    tokens = fn()
    _sync(device)
    return tokens, time.perf_counter() - t0


def bench_builtin(args: argparse.Namespace, vocab: int, routes: bool, overlap: bool) -> list[Measurement]:
    from rollout.types import SamplingParams
    from rollout.worker import RolloutWorker

    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed)
    warm_sampling = SamplingParams(max_new_tokens=min(4, args.new_tokens), temperature=args.temperature, seed=args.seed)
    results = []
    with RolloutWorker(args.model, engine="builtin", device=args.device, dtype=args.dtype, overlap=overlap,
                       return_routed_experts=routes, **args.engine_option) as worker:
        for batch in args.batch:
            worker.generate(make_prompts(vocab, batch, args.prompt_len, args.seed + WARMUP_SEED_OFFSET), warm_sampling)
            prompts = make_prompts(vocab, batch, args.prompt_len, args.seed)
            rollouts: list = []

            def run() -> int:
                rollouts[:] = worker.generate(prompts, sampling)
                return sum(len(r.output_ids) for r in rollouts)

            tokens, seconds = _timed(run, args.device)
            results.append(Measurement("builtin", routes, overlap, batch, tokens, seconds, tokens / seconds,
                                       note=_check_rollouts(rollouts, args, routes),
                                       stats=dict(getattr(worker.backend, "stats", {}))))
    return results


def _check_rollouts(rollouts: list, args: argparse.Namespace, routes: bool) -> str:
    """A timing only counts if the work was really done: full outputs, and routes of the promised shape."""
    problems = []
    short = sum(len(r.output_ids) != args.new_tokens for r in rollouts)
    if short:
        problems.append(f"{short} requests stopped early ({sorted({r.finish_reason for r in rollouts})})")
    if routes:
        expected = args.prompt_len + args.new_tokens - 1
        bad = sum(r.routed_experts is None or r.routed_experts.num_tokens != expected for r in rollouts)
        if bad:
            problems.append(f"{bad} requests lack routes for {expected} tokens")
    return "; ".join(problems)


def bench_transformers(args: argparse.Namespace, vocab: int) -> list[Measurement]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device_map=args.device,
                                                 experts_implementation=args.hf_experts)
    model.eval()
    print(f"transformers: experts_implementation={model.config._experts_implementation}", flush=True)
    sampling = dict(do_sample=args.temperature > 0, pad_token_id=0, eos_token_id=None)
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_k=None, top_p=None)

    def generate(prompts: list[list[int]], new_tokens: int) -> int:
        ids = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, **sampling)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    results = []
    for batch in args.batch:
        generate(make_prompts(vocab, batch, args.prompt_len, args.seed + WARMUP_SEED_OFFSET), min(4, args.new_tokens))
        prompts = make_prompts(vocab, batch, args.prompt_len, args.seed)
        tokens, seconds = _timed(lambda: generate(prompts, args.new_tokens), args.device)
        results.append(Measurement("transformers", None, None, batch, tokens, seconds, tokens / seconds))
    return results


def bench_sglang(args: argparse.Namespace, vocab: int, routes: bool, overlap: bool) -> list[Measurement]:
    """Real SGLang in a child process: it needs its own site-packages (and transformers) on PYTHONPATH."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps({
            str(b): {"timed": make_prompts(vocab, b, args.prompt_len, args.seed),
                     "warmup": make_prompts(vocab, b, args.prompt_len, args.seed + WARMUP_SEED_OFFSET)}
            for b in args.batch}))
        cmd = [sys.executable, "-m", "bench.sglang_offline", "--model", str(args.model), "--prompts", str(prompts_file),
               "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature), "--seed", str(args.seed),
               "--routes", "on" if routes else "off", "--overlap", "on" if overlap else "off"]
        cmd += [f"--option={key}={json.dumps(value)}" for key, value in args.sglang_option.items()]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.sglang_site, str(Path(__file__).resolve().parents[1])]))
        # its own session, so a hung run is killed with the scheduler processes SGLang forks (they hold GPU memory)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=args.sglang_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"sglang_offline did not finish in {args.sglang_timeout:.0f}s; killed") from None
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"sglang_offline exited {proc.returncode} without a result (its log is on stderr above)")
    return [Measurement("sglang", routes, overlap, r["batch"], r["tokens"], r["seconds"], r["tok_s"], note=r.get("note", ""))
            for r in json.loads(lines[-1][len(RESULT_PREFIX):])]


def _fmt_flag(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def render_table(measurements: list[Measurement], batches: list[int]) -> str:
    rows: dict[tuple, dict[int, Measurement]] = {}
    for m in measurements:
        rows.setdefault((m.engine, m.routes, m.overlap), {})[m.batch] = m
    header = f"{'engine':<13}{'routes':<8}{'overlap':<9}" + "".join(f"{f'tok/s b={b}':>14}{'roofline':>10}" for b in batches)
    lines = [header, "-" * len(header)]
    for (engine, routes, overlap), by_batch in rows.items():
        cells = ""
        for b in batches:
            m = by_batch.get(b)
            share = "" if m is None or m.roofline_share is None else f"{100 * m.roofline_share:.1f}%"
            cells += f"{'' if m is None else f'{m.tok_s:,.0f}':>14}{share:>10}"
        lines.append(f"{engine:<13}{_fmt_flag(routes):<8}{_fmt_flag(overlap):<9}{cells}")
    notes = [f"  {m.engine} routes={_fmt_flag(m.routes)} overlap={_fmt_flag(m.overlap)} b={m.batch}: {m.note}"
             for m in measurements if m.note]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def ratios(measurements: list[Measurement], batches: list[int]) -> dict[str, dict[int, float]]:
    """The quotients issue 8 sets targets on, for every batch where both sides were measured."""
    def tok_s(engine: str, routes: bool | None, overlap: bool | None, batch: int) -> float | None:
        hits = [m.tok_s for m in measurements if (m.engine, m.routes, m.overlap, m.batch) == (engine, routes, overlap, batch)]
        return hits[0] if hits else None

    pairs = {
        "builtin routes on/off (overlap on), target >= 0.98": (("builtin", True, True), ("builtin", False, True)),
        "builtin overlap on/off (routes on), target > 1": (("builtin", True, True), ("builtin", True, False)),
        "builtin (routes on, overlap on) / transformers, target >= 10": (("builtin", True, True), ("transformers", None, None)),
        "builtin / sglang (routes on, overlap on), target >= 0.5": (("builtin", True, True), ("sglang", True, True)),
        "sglang routes on/off (overlap on)": (("sglang", True, True), ("sglang", False, True)),
    }
    out: dict[str, dict[int, float]] = {}
    for name, (num, den) in pairs.items():
        for b in batches:
            a, c = tok_s(*num, b), tok_s(*den, b)
            if a is not None and c:
                out.setdefault(name, {})[b] = a / c
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default with --quick: a fresh tiny-qwen3-moe)")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke run: {QUICK_PRESET}, tiny batches and lengths")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="builtin,transformers", help="comma list of builtin, transformers")
    p.add_argument("--modes", help="builtin modes as routes/overlap pairs, e.g. 'on/on,off/on' (default: all four)")
    p.add_argument("--engine-option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="passed to RolloutWorker (value parsed as JSON when it parses), e.g. max_batch_tokens=8192")
    p.add_argument("--hf-experts", default="grouped_mm",
                   help="transformers experts_implementation (generate itself switches grouped_mm to batched_mm for decode on GPU)")
    p.add_argument("--sglang", action="store_true", help="also run real SGLang (bench.sglang_offline) in a child process")
    p.add_argument("--sglang-site", default="/tmp/sglang-site", help="unpacked SGLang site-packages (../shared/tools/sglang-on-gpu)")
    p.add_argument("--sglang-option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword, e.g. mem_fraction_static=0.7")
    p.add_argument("--sglang-timeout", type=float, default=240.0, help="seconds per SGLang child process")
    p.add_argument("--bandwidth", type=float, help="copy bandwidth in TB/s; measured on --device when omitted")
    p.add_argument("--json", help="write every measurement, the roofline and the ratios here")
    args = p.parse_args(argv)
    quick = dict(batch=[4, 8], prompt_len=16, new_tokens=8, device="cpu", dtype="float32")
    full = dict(batch=[64, 256], prompt_len=128, new_tokens=64,
                device="cuda" if torch.cuda.is_available() else "cpu", dtype="bfloat16")
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.engine_option = dict(args.engine_option)
    if "kv_slots" not in args.engine_option:
        # Room for every warm-up and timed sequence at once, so no run pays for prefix-cache eviction (finished
        # sequences stay cached); eviction has its own cost, worth measuring on its own, not folded in here.
        needed = 2 * sum(b * (args.prompt_len + args.new_tokens) for b in args.batch)
        args.engine_option["kv_slots"] = max(MIN_KV_SLOTS, 1 << (needed - 1).bit_length())
    args.sglang_option = dict(args.sglang_option)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - {"builtin", "transformers"})
    if unknown:
        p.error(f"unknown engine(s) {unknown}; use builtin, transformers (and --sglang)")
    args.modes = BUILTIN_MODES if args.modes is None else tuple(_parse_mode(m, p) for m in args.modes.split(","))
    if args.model is None and not args.quick:
        p.error("--model is required without --quick")
    return args


def _parse_mode(text: str, p: argparse.ArgumentParser) -> tuple[bool, bool]:
    flags = {"on": True, "off": False}
    parts = text.strip().split("/")
    if len(parts) != 2 or not set(parts) <= set(flags):
        p.error(f"mode {text!r} is not ROUTES/OVERLAP with on|off, e.g. on/on")
    return flags[parts[0]], flags[parts[1]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from rollout.presets import init_model

            args.model = init_model(QUICK_PRESET, Path(tmp) / QUICK_PRESET, dtype=args.dtype)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    vocab = read_config(args.model)["vocab_size"]
    weight_bytes = checkpoint_weight_bytes(args.model)
    bandwidth = args.bandwidth * 1e12 if args.bandwidth else copy_bandwidth(args.device)
    print(f"device: {device_name(args.device)}; weights {weight_bytes / 1e9:.2f} GB; "
          f"copy bandwidth {bandwidth / 1e12:.3f} TB/s; batches {args.batch}, {args.prompt_len} prompt + "
          f"{args.new_tokens} new tokens, temperature {args.temperature}, {args.dtype}; "
          f"built-in engine options {args.engine_option}", flush=True)

    _free_device_memory()
    jobs: list[tuple[str, Callable[[], list[Measurement]]]] = []
    if args.sglang:  # first, while this process holds no GPU memory that SGLang's static fraction could collide with
        jobs += [(f"sglang routes={_fmt_flag(r)} overlap={_fmt_flag(o)}", lambda r=r, o=o: bench_sglang(args, vocab, r, o))
                 for r, o in SGLANG_MODES]
    if "builtin" in args.engines:
        jobs += [(f"builtin routes={_fmt_flag(r)} overlap={_fmt_flag(o)}", lambda r=r, o=o: bench_builtin(args, vocab, r, o))
                 for r, o in args.modes]
    if "transformers" in args.engines:
        jobs.append(("transformers generate", lambda: bench_transformers(args, vocab)))

    measurements: list[Measurement] = []
    failures: dict[str, str] = {}

    def save() -> None:
        """Rewritten after every job, so a run cut short by a time limit still leaves what it measured."""
        if args.json:
            atomic_write_text(args.json, json.dumps({
                "device": device_name(args.device), "model": str(args.model), "weight_bytes": weight_bytes,
                "copy_bandwidth_Bps": bandwidth, "settings": {k: getattr(args, k) for k in (
                    "batch", "prompt_len", "new_tokens", "dtype", "temperature", "seed", "hf_experts", "engine_option",
                    "sglang_option")},
                "roofline_tok_s": {str(b): decode_roofline_tok_s(b, weight_bytes, bandwidth) for b in args.batch},
                "measurements": [asdict(m) for m in measurements], "ratios": ratios(measurements, args.batch),
                "failures": failures, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2))

    for name, job in jobs:
        t0 = time.perf_counter()
        try:  # one engine failing must not cost the others' numbers
            got = job()
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.0f}s: {failures[name]}", flush=True)
            save()
            continue
        finally:  # the job's engine is unreachable now: hand its memory back before the next one loads
            _free_device_memory()
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s (load, warm-up and timed runs)", flush=True)
        for m in got:
            m.roofline_share = m.tok_s / decode_roofline_tok_s(m.batch, weight_bytes, bandwidth)
            print(f"[{name}] batch {m.batch}: {m.tokens} tokens in {m.seconds:.2f}s = {m.tok_s:,.0f} tok/s "
                  f"({100 * m.roofline_share:.1f}% of roofline) {m.note}", flush=True)
        measurements += got
        save()

    print("\ntok/s = generated tokens / wall time of the whole generate call (prefill included); "
          "roofline = batch x copy bandwidth / weight bytes")
    print(render_table(measurements, args.batch))
    for name, by_batch in ratios(measurements, args.batch).items():
        print(f"{name}: " + ", ".join(f"b={b}: {v:.2f}" for b, v in by_batch.items()))
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
