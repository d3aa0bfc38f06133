"""The consistency report of a run: JSON for machines, Markdown and a PNG for people.

Inputs are plain arrays (per-layer agreement, per-token |dlogp|) so the report
can be rebuilt or tested without running a model.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rollout.atomic import atomic_write_bytes, atomic_write_text
from rollout.types import Rollout

NATIVE = "native"
REPLAY = "replay"
PLOT_NAME = "report.png"


@dataclass
class Condition:
    """One trainer forward condition (native routing, or replay) measured against the rollout."""

    label: str  # as shown in the plot legend
    layer_agreement: np.ndarray  # [num_moe_layers], share of rows with the rollout's top-k set
    abs_logprob_diff: np.ndarray  # [num_response_tokens], |logp_rollout - logp_trainer|
    mismatch: dict[str, float]  # trainer_bridge.metrics.logprob_mismatch output

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "routing_agreement": _finite(float(np.nanmean(self.layer_agreement))),
            "routing_agreement_min_layer": _finite(float(np.nanmin(self.layer_agreement))),
            "routing_agreement_per_layer": [_finite(float(x)) for x in self.layer_agreement],
            "mean_abs_logprob_diff": self.mismatch["mean_abs"],
            "max_abs_logprob_diff": self.mismatch["max_abs"],
            "k3_kl": self.mismatch["k3_kl"],
            "ratio_outside": self.mismatch["ratio_outside"],
            "tokens": self.mismatch["tokens"],
        }


def rollout_stats(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """Sizes of a set of rollouts, shared by the run report and ``r3 inspect``."""
    routed = [r.routed_experts for r in rollouts if r.routed_experts is not None]
    rows = sum(x.num_tokens for x in routed)
    return {
        "sequences": len(rollouts),
        "prompt_tokens": sum(len(r.prompt_ids) for r in rollouts),
        "generated_tokens": sum(len(r.output_ids) for r in rollouts),
        "sequences_with_routes": len(routed),
        "route_rows": rows,
        "route_dtype": str(routed[0].ids.dtype) if routed else None,
        "route_bytes_per_token": sum(x.nbytes for x in routed) / rows if rows else 0.0,
        "finish_reasons": {k: sum(r.finish_reason == k for r in rollouts)
                           for k in sorted({r.finish_reason for r in rollouts})},
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def build_report(
    native: Condition, replay: Condition | None, rollout: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """``report.json``'s content; ``replay`` is ``None`` when the recipe turns replay off."""
    report: dict[str, Any] = {
        "run": run,
        "rollout": rollout,
        NATIVE: native.summary(),
        REPLAY: None if replay is None else replay.summary(),
    }
    if replay is not None:
        n, r = native.mismatch, replay.mismatch
        report["effect"] = {
            "mean_abs_logprob_diff_ratio": _ratio(n["mean_abs"], r["mean_abs"]),
            "k3_kl_ratio": _ratio(n["k3_kl"], r["k3_kl"]),
        }
    return report


def _ratio(native: float, replay: float) -> float | None:
    """How many times smaller the replay number is (``None`` when replay reaches exactly 0)."""
    return native / replay if replay > 0 else None


def write_report(out_dir: Path, report: dict[str, Any], native: Condition, replay: Condition | None) -> None:
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(report))
    atomic_write_bytes(out_dir / PLOT_NAME, plot_png(native, replay))


def table(report: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    rows = [("", "native", "replay")]
    conditions = [report[NATIVE], report[REPLAY]]
    for title, key, fmt in (
        ("routing agreement", "routing_agreement", "{:.4%}"),
        ("min layer agreement", "routing_agreement_min_layer", "{:.4%}"),
        ("mean |dlogp|", "mean_abs_logprob_diff", "{:.5f}"),
        ("max |dlogp|", "max_abs_logprob_diff", "{:.4f}"),
        ("k3 KL", "k3_kl", "{:.3e}"),
        ("ratio outside [0.5, 2]", "ratio_outside", "{:.4%}"),
    ):
        rows.append((title, *(("-" if c is None or c[key] is None else fmt.format(c[key])) for c in conditions)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, width)))
             for r in rows]
    ro = report["rollout"]
    lines.append(
        f"rollout: {ro['sequences']} sequences, {ro['generated_tokens']} generated tokens, "
        f"{ro['tokens_per_second']:.1f} tok/s, {ro['route_bytes_per_token']:.0f} route bytes/token"
    )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    run, ro = report["run"], report["rollout"]
    replay_mode = run["replay"]
    parts = [
        "# R3 consistency report",
        "",
        f"Model `{run['model']}` (fingerprint `{run['model_fingerprint']}`). Rollout: {ro['engine']} engine, "
        f"{ro['dtype']}, overlap {'on' if ro['overlap'] else 'off'}, on {ro['device']}. Trainer: transformers, "
        f"{run['trainer_dtype']} on {run['trainer_device']}, replay mode `{replay_mode}`.",
        "",
        "```",
        table(report),
        "```",
        "",
        "*Routing agreement*: share of (token, MoE layer) rows where the ids reaching the trainer's "
        "experts are the rollout's top-k set; rows without a rollout route (each sequence's final token) "
        "are left out. *|dlogp|*: |rollout logprob - trainer logprob| per generated token. *k3 KL*: mean of "
        "exp(r) - 1 - r with r = logp_rollout - logp_trainer.",
        "",
    ]
    effect = report.get("effect")
    if effect:
        def times(x: float | None) -> str:
            return "to exactly zero" if x is None else f"{x:.2f}x"

        parts += [
            f"Effect of replay: mean |dlogp| shrinks {times(effect['mean_abs_logprob_diff_ratio'])}, "
            f"k3 KL {times(effect['k3_kl_ratio'])}. What remains is numerics (rollout {ro['dtype']} vs "
            f"trainer {run['trainer_dtype']}), which replay does not touch.",
            "",
        ]
    parts += [f"![per-layer agreement and |dlogp| distribution]({PLOT_NAME})", ""]
    return "\n".join(parts)


def plot_png(native: Condition, replay: Condition | None) -> bytes:
    buf = io.BytesIO()
    plot_figure(native, replay).savefig(buf, format="png")
    return buf.getvalue()


def plot_figure(native: Condition, replay: Condition | None) -> Any:
    """Two panels: per-layer routing agreement, and the |dlogp| distribution; one colour per condition."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    conditions = [c for c in (native, replay) if c is not None]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_layers, ax_hist = fig.subplots(1, 2)
    layers = np.arange(len(native.layer_agreement))
    width = 0.8 / len(conditions)
    for i, cond in enumerate(conditions):
        ax_layers.bar(layers + (i - (len(conditions) - 1) / 2) * width, 100 * cond.layer_agreement, width,
                      label=cond.label)
    low = min(float(np.nanmin(c.layer_agreement)) for c in conditions)
    ax_layers.set_ylim(max(0.0, 100 * low - 2 * (100 - 100 * low) - 0.5), 100.2)
    ax_layers.set_xticks(layers)
    ax_layers.set_xlabel("MoE layer")
    ax_layers.set_ylabel("routing agreement with rollout (%)")
    ax_layers.set_title("Per-layer routing agreement")
    ax_layers.legend(loc="lower left")

    floor = 1e-7
    values = np.concatenate([np.maximum(c.abs_logprob_diff, floor) for c in conditions])
    low_edge = max(floor, float(values.min()) / 2)
    bins = np.logspace(np.log10(low_edge), np.log10(max(float(values.max()), low_edge * 10)), 50)
    for cond in conditions:
        ax_hist.hist(np.maximum(cond.abs_logprob_diff, floor), bins=bins, histtype="step", linewidth=1.6,
                     label=f"{cond.label} (mean {cond.mismatch['mean_abs']:.4f})")
    ax_hist.set_xscale("log")
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel(f"|logp rollout - logp trainer| (values below {floor:g} drawn at {floor:g})")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title("|dlogp| distribution")
    ax_hist.legend(loc="upper right")
    fig.tight_layout()
    return fig
