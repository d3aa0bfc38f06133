"""Rollout throughput: the built-in engine beside real SGLang, same checkpoint, same card, same call.

Workloads are ``BATCHxPROMPT+NEW`` (``--workload``; default the four of issue 15: two short
ones and two RL-shaped ones with long outputs). Each engine mode loads once and runs every
workload in turn; SGLang runs routes on and off (overlap on), the built-in engine routes on
and off with overlap on, and routes on with overlap off.

**tok/s = generated tokens / wall time of the whole generate call**, prefill included, timed
from the call to its return with the device synchronised on both sides. Prompts are random
token ids (the same ones for every engine), every request runs to exactly NEW tokens (no stop
tokens: ``ignore_eos``), and each workload first runs an untimed warm-up of the same batch and
prompt length on other prompts, with up to ``WARMUP_MAX_NEW_TOKENS`` new tokens: long enough that
the warm-up walks through the same prefill/decode mix as the timed call, so one-off costs
(Triton specialisations, allocator growth) stay out of the figure, and no timed prompt is served
from a prefix cache. Both engines get the same warm-up. The built-in engine's counters after the
timed call include its slowest steps (host time per ``step()``), where a one-off cost shows. The built-in engine
runs its defaults (sized from free memory, like SGLang's ``mem_fraction_static``) plus any
``--engine-option``; SGLang gets decode CUDA graphs up to the largest batch
(``cuda_graph_max_bs_decode``) unless an ``--sglang-option`` says otherwise.

"roofline" is the share of ``bench.roofline.workload_roofline`` for that workload: the
weights each step uses, the KV cache it reads and its logits, over the copy bandwidth
measured in the same run, plus the prefill floor.

``--budget-s`` bounds the whole run: a job (one engine mode) is started only if the time
left covers its estimate, and what is measured is written to ``--json`` after every job.

GPU: ``python -m bench.rollout_throughput --model /tmp/bench-qwen3-moe --sglang --json $OUT/throughput.json``
CPU smoke test: ``python -m bench.rollout_throughput --quick``
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.roofline import DEFAULT_WORKLOADS, Workload, copy_bandwidth, device_name, matmul_flops, model_bytes, workload_roofline
from bench.sglang_offline import RESULT_PREFIX, parse_option
from rollout.atomic import atomic_write_text

QUICK_PRESET = "tiny-qwen3-moe"
QUICK_WORKLOADS = ("4x16+8", "8x16+8")
WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts never share a prefix with timed ones
WARMUP_MAX_NEW_TOKENS = 64  # a 4-token warm-up left one-off costs in the timed call (H200, 2026-12-01: 256x128+64)
SLOWEST_STEPS = 3  # how many of the timed call's slowest steps the stats name
BUILTIN_MODES = ((True, True), (False, True), (True, False))  # (routes, overlap): the three the targets compare
SGLANG_ROUTES = (True, False)
# first guesses of a job's seconds beyond its workloads (load, graph capture), before one was measured
STARTUP_GUESS_S = {"sglang": 75.0, "builtin": 40.0}
ASSUMED_ROOFLINE_SHARE = 0.35  # to guess a job's seconds from the roofline before any was measured


@dataclass
class Measurement:
    engine: str  # "builtin" or "sglang"
    routes: bool
    overlap: bool
    workload: str
    batch: int
    tokens: int
    seconds: float
    tok_s: float
    roofline_share: float | None = None
    note: str = ""
    stats: dict | None = None  # the built-in engine's counters after the timed call


def make_prompts(vocab_size: int, w: Workload, seed: int) -> list[list[int]]:
    """Random token ids; the seed includes the shape so workloads share no prefix."""
    rng = np.random.default_rng([seed, w.batch, w.prompt_len])
    return rng.integers(0, vocab_size, size=(w.batch, w.prompt_len)).tolist()


def warmup_new_tokens(w: Workload) -> int:
    return min(w.new_tokens, WARMUP_MAX_NEW_TOKENS)


class StepTimer:
    """Host seconds of every ``engine.step()`` while installed, with the batch each one launched.

    With overlap a step's time is the device's pace, so a step far above the others is a one-off cost
    (a compile, an allocation) or a host stall, and the slowest ones say which step it was.
    """

    def __init__(self, engine) -> None:
        self.engine, self.steps = engine, []

    def __enter__(self) -> "StepTimer":
        step, launch = self.engine.step, self.engine._launch_or_fail
        shape = [0, 0]

        def timed_launch(batch):
            shape[:] = len(batch.requests), len(batch.input_ids)
            return launch(batch)

        def timed_step():
            shape[:] = 0, 0
            t0 = time.perf_counter()
            out = step()
            self.steps.append((time.perf_counter() - t0, *shape))
            return out

        # instance attributes: generate() calls self.step(), step() calls self._launch_or_fail()
        self.engine.step, self.engine._launch_or_fail = timed_step, timed_launch
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step, self.engine._launch_or_fail

    def summary(self) -> dict:
        times = [s[0] for s in self.steps]
        slowest = sorted(range(len(times)), key=times.__getitem__, reverse=True)[:SLOWEST_STEPS]
        return {"steps": len(times), "median_step_s": float(np.median(times)) if times else None,
                "slowest_steps": [{"index": i, "seconds": times[i], "requests": self.steps[i][1],
                                   "tokens": self.steps[i][2]} for i in slowest]}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _wait_for_device_memory(timeout_s: float = 30.0, free_share: float = 0.9) -> None:
    """After SGLang's processes exit, their memory comes back a little later: the next engine sizes its KV pool
    from free memory, so wait (bounded) until most of the device is free again."""
    if not torch.cuda.is_available():
        return
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        free, total = torch.cuda.mem_get_info()
        if free >= free_share * total:
            return
        time.sleep(0.5)
    free, total = torch.cuda.mem_get_info()
    print(f"[sglang] device memory still held after {timeout_s:.0f}s: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
          flush=True)


def check_rollouts(rollouts: list, w: Workload, routes: bool) -> str:
    """A timing only counts if the work was really done: full outputs, and routes of the promised shape."""
    problems = []
    short = sum(len(r.output_ids) != w.new_tokens for r in rollouts)
    if short:
        problems.append(f"{short} requests stopped early ({sorted({r.finish_reason for r in rollouts})})")
    if routes:
        expected = w.prompt_len + w.new_tokens - 1
        bad = sum(r.routed_experts is None or r.routed_experts.num_tokens != expected for r in rollouts)
        if bad:
            problems.append(f"{bad} requests lack routes for {expected} tokens")
    return "; ".join(problems)


def bench_builtin(args: argparse.Namespace, vocab: int, routes: bool, overlap: bool, deadline: float) -> list[Measurement]:
    from rollout.types import SamplingParams
    from rollout.worker import RolloutWorker

    results = []
    with RolloutWorker(args.model, engine="builtin", device=args.device, overlap=overlap,
                       return_routed_experts=routes, **args.engine_option) as worker:
        engine = worker.backend
        args.builtin_config = {k: v for k, v in asdict(engine.config).items()}
        print(f"[builtin] config {args.builtin_config}", flush=True)
        for w in args.workloads:
            if time.monotonic() > deadline:
                print(f"[builtin] {w.name}: skipped, budget spent", flush=True)
                continue
            warm = SamplingParams(max_new_tokens=warmup_new_tokens(w), temperature=args.temperature, seed=args.seed)
            worker.generate(make_prompts(vocab, w, args.seed + WARMUP_SEED_OFFSET), warm)
            prompts = make_prompts(vocab, w, args.seed)
            sampling = SamplingParams(max_new_tokens=w.new_tokens, temperature=args.temperature, seed=args.seed)
            _sync(args.device)
            with StepTimer(engine) as timer:
                t0 = time.perf_counter()
                rollouts = worker.generate(prompts, sampling)
                _sync(args.device)
                seconds = time.perf_counter() - t0
            tokens = sum(len(r.output_ids) for r in rollouts)
            results.append(Measurement("builtin", routes, overlap, w.name, w.batch, tokens, seconds, tokens / seconds,
                                       note=check_rollouts(rollouts, w, routes),
                                       stats={**engine.stats, **timer.summary()}))
            _report(results[-1], args)
    return results


def bench_sglang(args: argparse.Namespace, vocab: int, routes: bool, deadline: float) -> list[Measurement]:
    """Real SGLang in a child process: it needs its own site-packages (and transformers) on PYTHONPATH."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps({
            w.name: {"timed": make_prompts(vocab, w, args.seed), "new_tokens": w.new_tokens,
                     "warmup": make_prompts(vocab, w, args.seed + WARMUP_SEED_OFFSET),
                     "warmup_new_tokens": warmup_new_tokens(w)}
            for w in args.workloads}))
        options = {"cuda_graph_max_bs_decode": max(w.batch for w in args.workloads), **args.sglang_option}
        cmd = [sys.executable, "-m", "bench.sglang_offline", "--model", str(args.model), "--prompts", str(prompts_file),
               "--temperature", str(args.temperature), "--seed", str(args.seed),
               "--routes", "on" if routes else "off", "--overlap", "on"]
        cmd += [f"--option={key}={json.dumps(value)}" for key, value in options.items()]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.sglang_site, str(Path(__file__).resolve().parents[1])]))
        timeout = max(1.0, deadline - time.monotonic())
        # its own session, so a hung run is killed with the scheduler processes SGLang forks (they hold GPU memory)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            print(f"[sglang] killed after {timeout:.0f}s (budget)", flush=True)
    _wait_for_device_memory()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"sglang_offline exited {proc.returncode} without a result (its log is on stderr above)")
    results = []
    for r in json.loads(lines[-1][len(RESULT_PREFIX):]):  # partial results survive a kill: one line per workload
        w = Workload.parse(r["workload"])
        results.append(Measurement("sglang", routes, True, w.name, w.batch, r["tokens"], r["seconds"], r["tok_s"],
                                   note=r.get("note", "")))
        _report(results[-1], args)
    return results


def _report(m: Measurement, args: argparse.Namespace) -> None:
    roof = args.roofline.get(m.workload)
    if roof:
        m.roofline_share = m.tok_s / roof["tok_s"]
    share = f" ({100 * m.roofline_share:.1f}% of roofline)" if m.roofline_share is not None else ""
    print(f"[{m.engine} routes={_on(m.routes)} overlap={_on(m.overlap)}] {m.workload}: {m.tokens} tokens in "
          f"{m.seconds:.2f}s = {m.tok_s:,.0f} tok/s{share} {m.note}", flush=True)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def render_table(measurements: list[Measurement], workloads: list[Workload]) -> str:
    rows: dict[tuple, dict[str, Measurement]] = {}
    for m in measurements:
        rows.setdefault((m.engine, m.routes, m.overlap), {})[m.workload] = m
    header = f"{'engine':<9}{'routes':<7}{'overlap':<8}" + "".join(f"{w.name:>15}{'roof':>6}" for w in workloads)
    lines = [header, "-" * len(header)]
    for (engine, routes, overlap), by_workload in rows.items():
        cells = ""
        for w in workloads:
            m = by_workload.get(w.name)
            share = "" if m is None or m.roofline_share is None else f"{100 * m.roofline_share:.0f}%"
            cells += f"{'-' if m is None else f'{m.tok_s:,.0f}':>15}{share:>6}"
        lines.append(f"{engine:<9}{_on(routes):<7}{_on(overlap):<8}{cells}")
    notes = [f"  {m.engine} routes={_on(m.routes)} overlap={_on(m.overlap)} {m.workload}: {m.note}"
             for m in measurements if m.note]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


RATIOS = {  # name -> (numerator, denominator) as (engine, routes, overlap)
    "builtin / sglang, routes on (target >= 1.0)": (("builtin", True, True), ("sglang", True, True)),
    "builtin routes on / sglang routes off (stretch >= 0.9)": (("builtin", True, True), ("sglang", False, True)),
    "builtin routes on / off, overlap on (target >= 0.98)": (("builtin", True, True), ("builtin", False, True)),
    "builtin overlap on / off, routes on (target > 1)": (("builtin", True, True), ("builtin", True, False)),
    "sglang routes on / off": (("sglang", True, True), ("sglang", False, True)),
}


def ratios(measurements: list[Measurement], workloads: list[Workload]) -> dict[str, dict[str, float]]:
    """The quotients issue 15 sets targets on, for every workload where both sides were measured."""
    tok_s = {(m.engine, m.routes, m.overlap, m.workload): m.tok_s for m in measurements}
    out: dict[str, dict[str, float]] = {}
    for name, (num, den) in RATIOS.items():
        for w in workloads:
            a, b = tok_s.get(num + (w.name,)), tok_s.get(den + (w.name,))
            if a is not None and b:
                out.setdefault(name, {})[w.name] = a / b
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default with --quick: a fresh tiny-qwen3-moe)")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke run: {QUICK_PRESET}, workloads {QUICK_WORKLOADS}")
    p.add_argument("--workload", nargs="+", help=f"BATCHxPROMPT+NEW ... (default {' '.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--device")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", help="built-in modes as routes/overlap pairs, e.g. 'on/on,off/on' (default on/on,off/on,on/off; "
                                   "'none' for SGLang alone)")
    p.add_argument("--engine-option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="passed to RolloutWorker (value parsed as JSON when it parses), e.g. moe_backend=grouped_mm")
    p.add_argument("--sglang", action="store_true", help="also run real SGLang (bench.sglang_offline) in a child process")
    p.add_argument("--sglang-routes", default="on,off", help="SGLang modes: routes on, off or both (overlap on)")
    p.add_argument("--sglang-site", default="/tmp/sglang-site", help="unpacked SGLang site-packages (../shared/tools/sglang-on-gpu)")
    p.add_argument("--sglang-option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword, e.g. mem_fraction_static=0.8")
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds the whole run may take (jobs that would not fit are skipped)")
    p.add_argument("--bandwidth", type=float, help="copy bandwidth in TB/s; measured on --device when omitted")
    p.add_argument("--json", help="write every measurement, the roofline and the ratios here (after every job)")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    try:
        args.workloads = [Workload.parse(w) for w in (args.workload or (QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS))]
    except ValueError as exc:
        p.error(str(exc))
    args.engine_option = dict(args.engine_option)
    args.sglang_option = dict(args.sglang_option)
    flags = {"on": True, "off": False}
    if args.modes == "none":
        args.modes = ()
    elif args.modes is None:
        args.modes = BUILTIN_MODES
    else:
        modes = []
        for text in args.modes.split(","):
            parts = text.strip().split("/")
            if len(parts) != 2 or not set(parts) <= set(flags):
                p.error(f"mode {text!r} is not ROUTES/OVERLAP with on|off, e.g. on/on")
            modes.append((flags[parts[0]], flags[parts[1]]))
        args.modes = tuple(modes)
    routes = [r.strip() for r in args.sglang_routes.split(",") if r.strip()]
    if not set(routes) <= set(flags):
        p.error(f"--sglang-routes takes on, off or on,off; got {args.sglang_routes!r}")
    args.sglang_routes = tuple(flags[r] for r in routes)
    if args.model is None and not args.quick:
        p.error("--model is required without --quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from rollout.presets import init_model

            args.model = init_model(QUICK_PRESET, Path(tmp) / QUICK_PRESET)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    budget_end = start + args.budget_s if args.budget_s else float("inf")
    from rollout.moe_spec import read_config

    vocab = read_config(args.model)["vocab_size"]
    mb = model_bytes(args.model)
    cuda = torch.device(args.device).type == "cuda"
    bandwidth = args.bandwidth * 1e12 if args.bandwidth else copy_bandwidth(args.device)
    flops = matmul_flops(args.device) if cuda else None
    args.roofline = {w.name: workload_roofline(mb, w, bandwidth, flops) for w in args.workloads}
    args.builtin_config = None
    print(f"device: {device_name(args.device)}; weights {mb.weight_bytes / 1e9:.2f} GB; copy bandwidth "
          f"{bandwidth / 1e12:.3f} TB/s; workloads {[w.name for w in args.workloads]}; temperature {args.temperature}; "
          f"built-in engine options {args.engine_option}; budget {args.budget_s or 'none'} s", flush=True)
    _free_device_memory()

    jobs: list[tuple[str, str, Callable[[float], list[Measurement]]]] = []
    if args.sglang:  # first, while this process holds no GPU memory that SGLang's static fraction could collide with
        jobs += [("sglang", f"sglang routes={_on(r)}", lambda end, r=r: bench_sglang(args, vocab, r, end))
                 for r in args.sglang_routes]
    jobs += [("builtin", f"builtin routes={_on(r)} overlap={_on(o)}",
              lambda end, r=r, o=o: bench_builtin(args, vocab, r, o, end)) for r, o in args.modes]
    # the builtin headline mode runs right after SGLang's routes-on job, so a short budget still pairs them
    jobs.sort(key=lambda job: {"sglang routes=on": 0, "builtin routes=on overlap=on": 1}.get(job[1], 2))

    measurements: list[Measurement] = []
    failures: dict[str, str] = {}
    skipped: list[str] = []
    workload_s = sum(w.batch * w.new_tokens / (r["tok_s"] * ASSUMED_ROOFLINE_SHARE)
                     for w, r in zip(args.workloads, args.roofline.values()))
    last_job_s: dict[str, float] = {}

    def save() -> None:
        """Rewritten after every job, so a run cut short by a time limit still leaves what it measured."""
        if args.json:
            atomic_write_text(args.json, json.dumps({
                "device": device_name(args.device), "model": str(args.model), "copy_bandwidth_Bps": bandwidth,
                "bf16_matmul_flops": flops, "model_bytes": dataclasses.asdict(mb),
                "settings": {"workloads": [w.name for w in args.workloads], "temperature": args.temperature,
                             "seed": args.seed, "engine_option": args.engine_option, "sglang_option": args.sglang_option,
                             "builtin_config": args.builtin_config, "budget_s": args.budget_s},
                "roofline": args.roofline, "measurements": [asdict(m) for m in measurements],
                "ratios": ratios(measurements, args.workloads), "failures": failures, "skipped": skipped,
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2))

    for kind, name, job in jobs:
        estimate = last_job_s.get(kind, STARTUP_GUESS_S[kind] + workload_s)
        left = budget_end - time.monotonic()
        if left < estimate:
            skipped.append(f"{name}: {left:.0f}s left, estimate {estimate:.0f}s")
            print(f"[{name}] SKIPPED: {skipped[-1]}", flush=True)
            save()
            continue
        t0 = time.perf_counter()
        try:  # one engine failing must not cost the others' numbers
            measurements += job(budget_end)
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.0f}s: {failures[name]}", flush=True)
        finally:  # the job's engine is unreachable now: hand its memory back before the next one loads
            _free_device_memory()
        last_job_s[kind] = time.perf_counter() - t0
        print(f"[{name}] done in {last_job_s[kind]:.0f}s (load, warm-ups and timed runs)", flush=True)
        save()

    print(f"\ntok/s = generated tokens / wall time of the whole generate call (prefill included); roof = share of the "
          f"workload's roofline (weights + KV + logits at {bandwidth / 1e12:.2f} TB/s, prefill floor)")
    print(render_table(measurements, args.workloads))
    for name, by_workload in ratios(measurements, args.workloads).items():
        print(f"{name}: " + ", ".join(f"{w}: {v:.2f}" for w, v in by_workload.items()))
    for line in skipped:
        print(f"SKIPPED {line}")
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
