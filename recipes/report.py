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
AGREEMENT_DEFINITION = (
    "share of routed (token, MoE layer) rows where the ids reaching the trainer's experts are the rollout's "
    "top-k set, averaged over MoE layers; every layer has the same routed rows (each sequence's final token "
    "has none), so this is also the token-weighted share."
)


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
    native: Condition, replay: Condition | None, rollout: dict[str, Any], run: dict[str, Any],
    guard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``report.json``'s content; ``replay`` (and ``guard``) are ``None`` when the recipe turns replay off.

    ``guard``: the misalignment guard during the replayed forwards, as ``trainer_logprobs`` returns it
    (``mode``, ``threshold``, ``lowest_overlap``, ``warnings``).
    """
    report: dict[str, Any] = {
        "run": run,
        "rollout": rollout,
        NATIVE: native.summary(),
        REPLAY: None if replay is None else replay.summary(),
        "guard": guard,
    }
    if replay is not None:
        n, r = native.mismatch, replay.mismatch
        report["effect"] = {
            "mean_abs_logprob_diff_ratio": _ratio(n["mean_abs"], r["mean_abs"]),
            "k3_kl_ratio": _ratio(n["k3_kl"], r["k3_kl"]),
        }
    report["verdict"] = verdict(report)
    return report


def _times(x: float | None) -> str:
    return "to exactly zero" if x is None else f"{x:.2f}x"


def _smaller(ratio: float | None) -> str:
    """``ratio`` = native / replay."""
    if ratio is None:
        return "exactly zero"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x LARGER"


def _guard_words(guard: dict[str, Any] | None) -> str:
    if guard is None or guard["mode"] == "off":
        return "the misalignment guard was off"
    seen = "" if guard["lowest_overlap"] is None else (
        f" (lowest per-layer native/replayed overlap {guard['lowest_overlap']:.3f}, threshold {guard['threshold']:.3f})")
    if guard["warnings"]:
        return f"the misalignment guard FIRED {guard['warnings']} time(s){seen}"
    return f"the misalignment guard did not fire{seen}"


def verdict(report: dict[str, Any]) -> str:
    """One line: did replay reach every rollout route, did the guard fire, and by how much mismatch shrank."""
    native, replay, mode = report[NATIVE], report[REPLAY], report["run"]["replay"]
    agree = "routing agreement with the rollout (share of routed (token, MoE layer) rows)"
    if replay is None:
        return (f"Verdict: replay off, native routing only: {agree} {native['routing_agreement']:.2%}; "
                f"mean |dlogp| {native['mean_abs_logprob_diff']:.4g}, k3 KL {native['k3_kl']:.3g}.")
    effect = report["effect"]
    shrink = (f"with replay mean |dlogp| is {_smaller(effect['mean_abs_logprob_diff_ratio'])} and "
              f"k3 KL {_smaller(effect['k3_kl_ratio'])}")
    agreement = f"{agree} {native['routing_agreement']:.2%} native -> {replay['routing_agreement']:.2%} replayed"
    if mode == "r3":
        guard = report.get("guard")
        ok = (replay["routing_agreement"] == 1.0 and not (guard and guard["warnings"])
              and all(x is None or x > 1 for x in effect.values()))
        head = "R3 replay works" if ok else "R3 replay did NOT work as expected"
        return f"Verdict: {head}: {agreement}; {_guard_words(guard)}; {shrink}."
    return (f"Verdict: R2 replays the trainer's own routes, so it cannot fix rollout/trainer routing: {agreement}; "
            f"{shrink}.")


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
        f"{ro['tokens_per_second']:.1f} tok/s (engine load not included), "
        f"{ro['route_bytes_per_token']:.0f} route bytes/token"
    )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    run, ro = report["run"], report["rollout"]
    replay_mode = run["replay"]
    parts = [
        "# R3 consistency report",
        "",
        f"**{report['verdict']}**",
        "",
        f"Model `{run['model']}` (fingerprint `{run['model_fingerprint']}`). Rollout: {ro['engine']} engine, "
        f"{ro['dtype']}, overlap {'on' if ro['overlap'] else 'off'}, on {ro['device']}. Trainer: transformers, "
        f"{run['trainer_dtype']} on {run['trainer_device']}, replay mode `{replay_mode}`.",
        "",
        "```",
        table(report),
        "```",
        "",
        f"*Routing agreement*: {AGREEMENT_DEFINITION} *Min layer agreement*: the lowest layer's share. "
        "*|dlogp|*: |rollout logprob - trainer logprob| per generated token. *k3 KL*: mean of "
        "exp(r) - 1 - r with r = logp_rollout - logp_trainer. *tok/s*: generated tokens / wall time of "
        "the generate loop, engine load not included.",
        "",
    ]
    effect = report.get("effect")
    if effect:
        parts += [
            f"Effect of replay: mean |dlogp| shrinks {_times(effect['mean_abs_logprob_diff_ratio'])}, "
            f"k3 KL {_times(effect['k3_kl_ratio'])}. What remains is numerics (rollout {ro['dtype']} vs "
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
    """Two panels, one colour per condition and one legend above both (clear of the data).

    Agreement bars start at 0, so a 2-point gap looks like one; each bar is labelled with its
    value so the gap can still be read. The |dlogp| histogram has log axes; exact zeros (which a
    log axis cannot show) are drawn at a floor that the x-label then names.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    conditions = [c for c in (native, replay) if c is not None]
    fig = Figure(figsize=(11, 4.6), dpi=110)
    ax_layers, ax_hist = fig.subplots(1, 2)
    layers = np.arange(len(native.layer_agreement))
    width = 0.8 / len(conditions)
    handles = []
    for i, cond in enumerate(conditions):
        bars = ax_layers.bar(layers + (i - (len(conditions) - 1) / 2) * width, 100 * cond.layer_agreement, width)
        handles.append(bars)
        if len(layers) * len(conditions) <= 16:  # readable labels; wide models show the bars only
            ax_layers.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax_layers.set_ylim(0, 108)
    ax_layers.set_yticks(range(0, 101, 20))
    ax_layers.set_xticks(layers)
    ax_layers.set_xlabel("MoE layer")
    ax_layers.set_ylabel("routing agreement with rollout (%)")
    ax_layers.set_title("Per-layer routing agreement (bars from 0)")

    values = np.concatenate([c.abs_logprob_diff for c in conditions])
    positive = values[values > 0]
    floor = float(positive.min()) / 2 if positive.size else 1e-7
    top = max(float(values.max()), floor * 10)
    bins = np.logspace(np.log10(floor), np.log10(top), 50)
    for cond, color in zip(conditions, [h.patches[0].get_facecolor() for h in handles]):
        ax_hist.hist(np.maximum(cond.abs_logprob_diff, floor), bins=bins, histtype="step", linewidth=1.6, color=color)
    ax_hist.set_xscale("log")
    ax_hist.set_yscale("log")
    zeros = int((values == 0).sum())
    note = f" ({zeros} exact zeros drawn at {floor:.1e})" if zeros else ""
    ax_hist.set_xlabel(f"|logp rollout - logp trainer| per generated token{note}")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title("|dlogp| distribution")

    labels = [f"{c.label} (mean |dlogp| {c.mismatch['mean_abs']:.4f})" for c in conditions]
    fig.legend(handles, labels, loc="upper center", ncol=len(conditions), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig
