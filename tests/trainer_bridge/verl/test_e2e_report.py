"""``bench/verl_e2e/report.py`` reads what verl's file logger and the plugin's log lines actually look like."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl 0.9.x is not installed (see trainer_bridge/verl/requirements-ci.txt)")

from trainer_bridge.verl import plugin  # noqa: E402
from trainer_bridge.verl.counters import MicroBatchCount, ReplayTally  # noqa: E402
from verl.utils.tracking import FileLogger  # noqa: E402

REPORT = Path(__file__).resolve().parents[3] / "bench" / "verl_e2e" / "report.py"
spec = importlib.util.spec_from_file_location("verl_e2e_report", REPORT)
report = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = report
spec.loader.exec_module(report)


def write_run(root: Path, mode: str, k3: list[float], mismatched: float, monkeypatch) -> None:
    run = root / mode
    run.mkdir(parents=True)
    (run / "returncode").write_text("0\n")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(run / "metrics.jsonl"))
    logger = FileLogger("r3", f"e2e-{mode}")  # verl's own writer, as main_ppo's trainer uses it
    lines = []
    for step, value in enumerate(k3, start=1):
        data = {report.K3: value, "rollout_corr/kl": value / 2, "critic/score/mean": 0.1}
        if mode == "R3":
            data.update({report.REPLAYED: 9000.0, report.MISMATCHED: mismatched, report.AGREEMENT: 0.97})
            tally = ReplayTally([MicroBatchCount(9000, 9000 - int(mismatched), 0.97)])
            lines += [plugin.replay_line(plugin.OLD_LOGPROB_PASS, 32, tally), plugin.replay_line(plugin.UPDATE_PASS, 32, tally)]
        else:
            lines += [plugin.native_line(p, 32, "disabled") for p in (plugin.OLD_LOGPROB_PASS, plugin.UPDATE_PASS)]
        logger.log(data, step)
    logger.finish()
    # As Ray forwards a worker's stderr: a coloured actor prefix, then the logging format.
    (run / "main_ppo.log").write_text("".join(f"\x1b[36m(WorkerDict pid=7)\x1b[0m INFO:2026-12-01:{line}\n" for line in lines))


def test_report_reads_both_runs_and_passes_the_checks(tmp_path, monkeypatch):
    write_run(tmp_path, "R3", [1e-4, 2e-4, 1e-4], 0.0, monkeypatch)
    write_run(tmp_path, "off", [5e-3, 6e-3, 4e-3], 0.0, monkeypatch)
    summary = report.report(tmp_path)
    assert [s["step"] for s in summary["runs"]["R3"]["steps"]] == [1, 2, 3]
    assert summary["runs"]["R3"]["arrivals"] == {plugin.UPDATE_PASS: 3, plugin.OLD_LOGPROB_PASS: 3}
    assert summary["runs"]["off"]["arrivals"][plugin.UPDATE_PASS] == 3
    assert all(summary["checks"].values()), summary["checks"]
    assert json.loads((tmp_path / "summary.json").read_text())["checks"] == summary["checks"]


@pytest.mark.parametrize(
    "r3_k3, mismatched, failing",
    [
        ([1e-4, 7e-3, 1e-4], 0.0, "k3 KL with R3 below replay off at every step"),
        ([1e-4, 2e-4, 1e-4], 3.0, "replay agreement 100% on replayed rows"),
        ([1e-4, 2e-4], 0.0, "at least 3 steps each"),
    ],
)
def test_report_fails_the_check_that_does_not_hold(tmp_path, monkeypatch, r3_k3, mismatched, failing):
    write_run(tmp_path, "R3", r3_k3, mismatched, monkeypatch)
    write_run(tmp_path, "off", [5e-3, 6e-3, 4e-3], 0.0, monkeypatch)
    checks = report.report(tmp_path)["checks"]
    assert not checks[failing]
    assert sum(not ok for ok in checks.values()) == 1, checks
