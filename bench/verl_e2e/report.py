"""Read both end-to-end runs back: verl's per-step metrics, the plugin's log lines, the acceptance checks.

Usage: ``python3 bench/verl_e2e/report.py OUT`` with ``OUT/R3`` and ``OUT/off`` as ``launch.py`` wrote them.
Writes ``OUT/summary.json`` and prints a table per step, R3 against replay off.

Metric names are verl 0.9.1's: ``rollout_corr/*`` from ``compute_offpolicy_metrics``
(trainer log-probs against SGLang's, every step, with ``algorithm.rollout_correction`` on
by default), ``training/rollout_*`` from ``calculate_debug_metrics``, and the plugin's
``actor/r3/*`` (``trainer_bridge.verl.plugin``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.verl_e2e.launch import LOG_NAME, METRICS_NAME, MODES  # noqa: E402
from trainer_bridge.verl.plugin import (  # noqa: E402
    AGREEMENT_METRIC,
    LOG_PREFIX,
    MISMATCHED_ROWS_METRIC,
    OLD_LOGPROB_PASS,
    REPLAYED_ROWS_METRIC,
    UPDATE_PASS,
)

ACTOR = "actor/"  # verl prefixes the engine's update metrics with this
K3 = "rollout_corr/k3_kl"
REPLAYED, MISMATCHED, AGREEMENT = (ACTOR + m for m in (REPLAYED_ROWS_METRIC, MISMATCHED_ROWS_METRIC, AGREEMENT_METRIC))
METRICS = (
    K3, "rollout_corr/kl", "rollout_corr/log_ppl_abs_diff", "rollout_corr/ppl_ratio", "rollout_corr/chi2_token",
    "training/rollout_probs_diff_mean", "training/rollout_probs_diff_max", "training/rollout_actor_probs_pearson_corr",
    REPLAYED, MISMATCHED, AGREEMENT, "actor/ppo_kl", "actor/pg_clipfrac", "critic/score/mean",
    "response_length/mean", "timing_s/step",
)  # fmt: skip
ARRIVAL = re.compile(re.escape(LOG_PREFIX) + rf": routed_experts reached the actor \(({UPDATE_PASS}|{OLD_LOGPROB_PASS})")
MIN_STEPS = 3


def read_steps(path: Path) -> list[dict]:
    """verl's file logger: one JSON object per line, ``{"step": n, "data": {...}}``; a torn last line is skipped."""
    steps = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            steps.append({"step": entry.get("step"), **{k: entry["data"].get(k) for k in METRICS}})
    return steps


def read_arrivals(path: Path) -> dict[str, int]:
    counts = {UPDATE_PASS: 0, OLD_LOGPROB_PASS: 0}
    if path.is_file():
        with open(path, errors="replace") as log:
            for line in log:
                match = ARRIVAL.search(line)
                if match:
                    counts[match.group(1)] += 1
    return counts


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def checks(runs: dict[str, dict]) -> dict[str, bool]:
    """The issue's acceptance, as far as the logs can show it."""
    r3, off = runs["R3"]["steps"], runs["off"]["steps"]
    paired = list(zip(r3, off))
    return {
        "both runs completed": all(run["returncode"] == 0 for run in runs.values()),
        f"at least {MIN_STEPS} steps each": len(r3) >= MIN_STEPS and len(off) >= MIN_STEPS,
        "routed_experts reached the actor in every update step (both runs)": all(
            run["arrivals"][UPDATE_PASS] >= len(run["steps"]) > 0 for run in runs.values()
        ),
        "R3 replayed rows in every step": bool(r3) and all(finite(s[REPLAYED]) and s[REPLAYED] > 0 for s in r3),
        "replay agreement 100% on replayed rows": bool(r3) and all(s[MISMATCHED] == 0 for s in r3),
        "k3 KL with R3 below replay off at every step": bool(paired)
        and all(finite(a[K3]) and finite(b[K3]) and a[K3] < b[K3] for a, b in paired),
    }


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.4f}"
    return str(x)


def table(runs: dict[str, dict]) -> str:
    cols = ("step", K3, "rollout_corr/kl", "training/rollout_probs_diff_mean", REPLAYED, MISMATCHED, AGREEMENT)
    lines = ["| run | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for mode, run in runs.items():
        for step in run["steps"]:
            lines.append(f"| {mode} | " + " | ".join(fmt(step.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def report(out: str | os.PathLike) -> dict:
    out = Path(out)
    runs = {}
    for mode in MODES:
        run_dir = out / mode
        rc_file = run_dir / "returncode"
        runs[mode] = {
            "returncode": int(rc_file.read_text()) if rc_file.is_file() else None,
            "steps": read_steps(run_dir / METRICS_NAME),
            "arrivals": read_arrivals(run_dir / LOG_NAME),
        }
    summary = {"runs": runs, "checks": checks(runs)}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, out / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    summary = report(parser.parse_args(argv).out)
    print(table(summary["runs"]))
    for mode, run in summary["runs"].items():
        print(f"{mode}: returncode {run['returncode']}, {len(run['steps'])} steps, plugin lines {run['arrivals']}")
    for name, ok in summary["checks"].items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")


if __name__ == "__main__":
    main()
