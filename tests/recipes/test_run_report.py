"""The report from metric arrays alone: JSON keys, table, Markdown, and a PNG showing both conditions."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from recipes.report import Condition, build_report, markdown, plot_figure, plot_png, table, write_report


def _conditions():
    rng = np.random.default_rng(0)
    native = Condition("native routing", np.array([1.0, 0.96, 0.95, 0.97]), np.abs(rng.normal(0, 0.05, 200)),
                       {"mean_abs": 0.04, "max_abs": 0.9, "k3_kl": 5e-3, "ratio_outside": 0.01, "tokens": 200})
    replay = Condition("R3 replay (rollout routes)", np.ones(4), np.abs(rng.normal(0, 0.01, 200)),
                       {"mean_abs": 0.008, "max_abs": 0.04, "k3_kl": 6e-5, "ratio_outside": 0.0, "tokens": 200})
    return native, replay


GUARD = {"mode": "warn", "threshold": 0.75, "lowest_overlap": 0.98, "warnings": 0}
ROLLOUT = {"engine": "builtin", "device": "cpu", "dtype": "bfloat16", "overlap": True, "sequences": 4,
           "generated_tokens": 200, "tokens_per_second": 50.0, "route_bytes_per_token": 8.0}
RUN = {"model": "m", "model_fingerprint": "r3fp1:x", "replay": "r3", "trainer_dtype": "float32", "trainer_device": "cpu"}


def test_report_keys_and_text(tmp_path):
    native, replay = _conditions()
    report = build_report(native, replay, ROLLOUT, RUN, GUARD)
    for section, key in [("native", "routing_agreement"), ("replay", "routing_agreement"), ("native", "k3_kl"),
                         ("replay", "k3_kl"), ("native", "mean_abs_logprob_diff"),
                         ("replay", "mean_abs_logprob_diff"), ("rollout", "tokens_per_second"),
                         ("rollout", "route_bytes_per_token")]:
        assert isinstance(report[section][key], float), (section, key)
    assert report["native"]["routing_agreement"] == np.mean([1.0, 0.96, 0.95, 0.97])
    assert report["native"]["routing_agreement_min_layer"] == 0.95
    assert report["effect"]["mean_abs_logprob_diff_ratio"] == 0.04 / 0.008
    text = table(report)
    assert "97.0000%" in text and "100.0000%" in text and "50.0 tok/s" in text
    assert "shrinks 5.00x" in markdown(report)
    assert "tok/s (engine load not included)" in text
    write_report(tmp_path, report, native, replay)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]


def test_markdown_opens_with_a_one_line_verdict():
    native, replay = _conditions()
    report = build_report(native, replay, ROLLOUT, RUN, GUARD)
    lines = markdown(report).splitlines()
    assert lines[0] == "# R3 consistency report" and lines[2] == f"**{report['verdict']}**"
    assert report["verdict"] == (
        "Verdict: R3 replay works: routing agreement with the rollout (share of routed (token, MoE layer) rows) "
        "97.00% native -> 100.00% replayed; the misalignment guard did not fire (lowest per-layer native/replayed "
        "overlap 0.980, threshold 0.750); with replay mean |dlogp| is 5.00x smaller and k3 KL 83.33x smaller."
    )


def test_verdict_says_when_replay_or_the_guard_went_wrong():
    native, replay = _conditions()
    fired = build_report(native, replay, ROLLOUT, RUN, dict(GUARD, lowest_overlap=0.3, warnings=2))["verdict"]
    assert fired.startswith("Verdict: R3 replay did NOT work as expected")
    assert "the misalignment guard FIRED 2 time(s) (lowest per-layer native/replayed overlap 0.300" in fired
    replay.layer_agreement = np.array([1.0, 1.0, 0.99, 1.0])
    partial = build_report(native, replay, ROLLOUT, RUN, GUARD)["verdict"]
    assert partial.startswith("Verdict: R3 replay did NOT work") and "-> 99.75% replayed" in partial
    replay.mismatch = dict(replay.mismatch, mean_abs=0.08)
    assert "mean |dlogp| is 2.00x LARGER" in build_report(native, replay, ROLLOUT, RUN, GUARD)["verdict"]
    off = build_report(native, replay, ROLLOUT, RUN, dict(GUARD, mode="off", lowest_overlap=None))["verdict"]
    assert "the misalignment guard was off" in off


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plot_is_png_with_both_conditions_labelled_clear_of_the_data():
    native, replay = _conditions()
    data = plot_png(native, replay)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.size[0] > 600 and image.size[1] > 300
    fig = plot_figure(native, replay)
    fig.canvas.draw()  # lay the figure out, so extents are final
    ax_layers, ax_hist = fig.axes
    (legend,) = fig.legends  # one legend for both panels ...
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["native routing (mean |dlogp| 0.0400)", "R3 replay (rollout routes) (mean |dlogp| 0.0080)"]
    box = legend.get_window_extent()
    for ax in (ax_layers, ax_hist):
        assert ax.get_legend() is None
        assert not _overlap(box, ax.get_window_extent()), "... outside both plotting areas"
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert ax_layers.get_ylim()[0] == 0  # agreement bars start at 0: a 3-point gap looks like one
    assert [round(float(t.get_text()), 1) for t in ax_layers.texts] == [100.0, 96.0, 95.0, 97.0, 100.0, 100.0, 100.0, 100.0]
    low, high = ax_hist.get_xlim()
    values = np.concatenate([native.abs_logprob_diff, replay.abs_logprob_diff])
    assert low <= values.min() and values.max() <= high
    assert ax_hist.get_xlabel() == "|logp rollout - logp trainer| per generated token"  # no floor to explain


def test_plot_names_the_floor_only_for_exact_zeros():
    native, replay = _conditions()
    replay.abs_logprob_diff[:3] = 0.0
    label = plot_figure(native, replay).axes[1].get_xlabel()
    values = np.concatenate([native.abs_logprob_diff, replay.abs_logprob_diff])
    floor = float(values[values > 0].min()) / 2
    assert label == f"|logp rollout - logp trainer| per generated token (3 exact zeros drawn at {floor:.1e})"


def test_replay_off_has_one_condition():
    native, _ = _conditions()
    report = build_report(native, None, ROLLOUT, dict(RUN, replay="off"))
    assert report["replay"] is None and "effect" not in report
    assert report["verdict"].startswith("Verdict: replay off, native routing only")
    assert "native" in table(report)
    fig = plot_figure(native, None)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["native routing (mean |dlogp| 0.0400)"]
