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


ROLLOUT = {"engine": "builtin", "device": "cpu", "dtype": "bfloat16", "overlap": True, "sequences": 4,
           "generated_tokens": 200, "tokens_per_second": 50.0, "route_bytes_per_token": 8.0}
RUN = {"model": "m", "model_fingerprint": "r3fp1:x", "replay": "r3", "trainer_dtype": "float32", "trainer_device": "cpu"}


def test_report_keys_and_text(tmp_path):
    native, replay = _conditions()
    report = build_report(native, replay, ROLLOUT, RUN)
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
    write_report(tmp_path, report, native, replay)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]


def test_plot_is_png_with_both_conditions_labelled():
    native, replay = _conditions()
    data = plot_png(native, replay)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.size[0] > 600 and image.size[1] > 300
    fig = plot_figure(native, replay)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(l.startswith("native routing") for l in labels)
        assert any(l.startswith("R3 replay") for l in labels)
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_replay_off_has_one_condition():
    native, _ = _conditions()
    report = build_report(native, None, ROLLOUT, dict(RUN, replay="off"))
    assert report["replay"] is None and "effect" not in report
    assert "native" in table(report)
    fig = plot_figure(native, None)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["native routing"]
