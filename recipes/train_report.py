"""What ``r3 train`` writes: per-step metrics (JSONL), a summary with its checks (JSON, Markdown), curves (PNG).

Inputs are the per-step records of ``recipes/train_loop.py`` (plain dicts), so the report can
be rebuilt from ``metrics.jsonl`` alone.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rollout.atomic import atomic_write_bytes, atomic_write_text

PLOT_NAME = "report.png"
METRICS_NAME = "metrics.jsonl"
TIME_KEYS = ("time_rollout", "time_trainer", "time_weight_sync", "time_memory")
# (record key, axis title, log scale)
CURVES = (
    ("reward", "reward (task verifier)", False),
    ("k3_kl", "rollout-vs-trainer k3 KL", True),
    ("mean_abs_logprob_diff", "mean |logp rollout - logp trainer|", True),
    ("routing_agreement", "routing agreement with the rollout", False),
    ("clip_fraction", "clip fraction", False),
    ("grad_norm", "grad norm (before clipping)", False),
)


def _by_arm(records: Sequence[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["arm"] == arm), key=lambda r: r["step"])


def _edge_mean(values: list[float], first: bool) -> float:
    n = max(1, len(values) // 4)
    return float(np.mean(values[:n] if first else values[-n:]))


def summarize(records: Sequence[dict[str, Any]], arms: Sequence[str], run: dict[str, Any]) -> dict[str, Any]:
    """Per-arm summaries and the checks the issue asks for, stated as measured (never asserted here)."""
    per_arm = {}
    for arm in arms:
        rows = _by_arm(records, arm)
        reward = [r["reward"] for r in rows]
        per_arm[arm] = {
            "label": rows[0]["label"],
            "steps": len(rows),
            "reward_first_quarter": _edge_mean(reward, first=True),
            "reward_last_quarter": _edge_mean(reward, first=False),
            "reward_rises": _edge_mean(reward, first=False) > _edge_mean(reward, first=True),
            **{f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in (
                "k3_kl", "mean_abs_logprob_diff", "ratio_outside", "routing_agreement", "clip_fraction", "grad_norm")},
            "min_routing_agreement": float(min(r["routing_agreement"] for r in rows)),
            "min_replay_overlap": min((r["replay_overlap_min"] for r in rows if r["replay_overlap_min"] is not None),
                                      default=None),
            # step 0 includes warm-up (first forward, allocator), so the split is also given without it
            **{f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in TIME_KEYS},
            **{f"mean_{k}_after_first": float(np.mean([r[k] for r in rows[1:]])) if len(rows) > 1 else None
               for k in TIME_KEYS},
            "rollout_tokens_per_second": float(np.mean([r["rollout_tokens_per_second"] for r in rows])),
        }
    checks: dict[str, Any] = {}
    if "off" in per_arm and "r3" in per_arm:
        native, r3 = _by_arm(records, "off"), _by_arm(records, "r3")
        below = [b["k3_kl"] < a["k3_kl"] for a, b in zip(native, r3)]
        checks["r3_k3_kl_below_native"] = {"steps": sum(below), "of": len(below), "every_step": all(below)}
    if "r3" in per_arm:
        paired = [r["k3_kl"] < r["k3_kl_native_same_rollouts"] for r in _by_arm(records, "r3")]
        checks["r3_k3_kl_below_native_on_its_own_rollouts"] = {"steps": sum(paired), "of": len(paired),
                                                              "every_step": all(paired)}
        agreement = [r["routing_agreement"] for r in _by_arm(records, "r3")]
        checks["r3_routing_agreement_100"] = {"steps": sum(a == 1.0 for a in agreement), "of": len(agreement),
                                               "every_step": all(a == 1.0 for a in agreement)}
    checks["reward_rises"] = {s["label"]: s["reward_rises"] for s in per_arm.values()}
    return {"run": run, "arms": per_arm, "checks": checks}


def table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    arms = summary["arms"]
    rows = [("", *(s["label"] for s in arms.values()))]
    for title, key, fmt in (
        ("reward, first quarter", "reward_first_quarter", "{:.3f}"),
        ("reward, last quarter", "reward_last_quarter", "{:.3f}"),
        ("k3 KL (mean over steps)", "mean_k3_kl", "{:.3e}"),
        ("mean |dlogp|", "mean_mean_abs_logprob_diff", "{:.5f}"),
        ("ratio outside [0.5, 2]", "mean_ratio_outside", "{:.4%}"),
        ("routing agreement (min step)", "min_routing_agreement", "{:.4%}"),
        ("replay overlap in updates (min)", "min_replay_overlap", "{:.4f}"),
        ("clip fraction", "mean_clip_fraction", "{:.4f}"),
        ("grad norm", "mean_grad_norm", "{:.3f}"),
        ("rollout s/step", "mean_time_rollout", "{:.2f}"),
        ("trainer s/step", "mean_time_trainer", "{:.2f}"),
        ("weight sync s/step", "mean_time_weight_sync", "{:.3f}"),
        ("memory release+resume s/step", "mean_time_memory", "{:.3f}"),
        ("rollout tok/s", "rollout_tokens_per_second", "{:.0f}"),
    ):
        rows.append((title, *("-" if s[key] is None else fmt.format(s[key]) for s in arms.values())))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) for r in rows]
    lines += [f"check {name}: {json.dumps(value)}" for name, value in summary["checks"].items()]
    return "\n".join(lines)


def markdown(summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    recipe = summary["run"]["recipe"]
    ro, tr, cfg = recipe["rollout"], recipe["trainer"], recipe["train"]
    arms = list(summary["arms"])
    label = {a: s["label"] for a, s in summary["arms"].items()}
    parts = [
        "# R3 training report (GRPO)",
        "",
        f"Model `{summary['run']['model']}`. Task `{cfg['task']}` (modulus {cfg['modulus']}). Each step: "
        f"{ro['num_prompts']} prompts x {cfg['group_size']} completions of {ro['sampling']['max_new_tokens']} tokens "
        f"from the built-in engine ({ro['dtype']}, overlap {'on' if ro['overlap'] else 'off'}, {ro['device']}); "
        f"trainer transformers {tr['dtype']} on {tr['device']}, {cfg['mini_batches']} optimizer steps "
        f"(AdamW, lr {cfg['learning_rate']:g}), behaviour policy = rollout logprobs. Every arm starts from the "
        f"same weights and samples with the same seeds. Wall time {summary['run']['seconds']:.1f} s.",
        "",
        "```",
        table(summary),
        "```",
        "",
        "*k3 KL* and *|dlogp|*: rollout logprobs against the trainer's old-logprob pass, on the weights that "
        "sampled them. *Routing agreement*: share of (token, MoE layer) rows where the ids reaching the "
        "trainer's experts are the rollout's top-k set. *R2* replays the routes the trainer itself chose in "
        "the old-logprob pass, so it removes drift between the trainer's own passes, not the rollout/trainer "
        "mismatch; *R3* replays the rollout's routes. *Replay overlap in updates*: share of the replayed "
        "top-k that the trainer's own router would pick in the update passes (lowest layer and micro-batch): "
        "how far the router moved after an optimizer step. The checks compare R3 with the native arm at each "
        "step (two policies once training diverges) and, paired, R3 with native routing on R3's own rollouts.",
        "",
        "## Per step",
        "",
        "| step | " + " | ".join(f"{label[a]} reward | {label[a]} k3 KL | {label[a]} agreement" for a in arms) + " |",
        "|---|" + "---|---|---|" * len(arms),
    ]
    by_arm = {a: _by_arm(records, a) for a in arms}
    for step in range(max(len(v) for v in by_arm.values())):
        cells = []
        for a in arms:
            r = by_arm[a][step] if step < len(by_arm[a]) else None
            cells += ["-"] * 3 if r is None else [f"{r['reward']:.3f}", f"{r['k3_kl']:.2e}", f"{r['routing_agreement']:.4%}"]
        parts.append(f"| {step} | " + " | ".join(cells) + " |")
    parts += ["", f"![training curves of every arm]({PLOT_NAME})", ""]
    return "\n".join(parts)


def plot_png(records: Sequence[dict[str, Any]], arms: Sequence[str]) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(13, 7), dpi=100)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title, log) in zip(axes, CURVES):
        for arm in arms:
            rows = _by_arm(records, arm)
            values = [max(r[key], 1e-12) if log else r[key] for r in rows]
            ax.plot([r["step"] for r in rows], values, marker="o", markersize=3, label=rows[0]["label"])
        if log:
            ax.set_yscale("log")
        if key == "routing_agreement":
            ax.set_ylim(min(0.9, ax.get_ylim()[0]), 1.005)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(out_dir: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    arms = list(summary["arms"])
    atomic_write_text(out_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(summary, records))
    atomic_write_bytes(out_dir / PLOT_NAME, plot_png(records, arms))
