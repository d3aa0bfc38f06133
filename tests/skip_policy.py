"""CI's skip policy: on a CPU machine every test not marked ``gpu`` must run.

A test that skips because a package is missing, a fixture file is absent or a
module failed to import says nothing, and CI would stay green while a whole area
goes untested (issue 16: 52 tests skipped silently in a fresh clone). With
``R3_STRICT_SKIPS=1`` in the environment (``.ci/run`` sets it), :func:`pytest_configure`
(the root conftest's) registers :class:`StrictSkips`, and the run fails when anything but a ``gpu`` test
skipped, whole modules skipped at collection included; the offenders are listed
with their reasons at the end of the output.

This module imports nothing but pytest, so a plain pytest run in a scratch folder
can load it as its conftest does (``tests/test_skip_policy.py``) without paying for torch.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

STRICT_ENV = "R3_STRICT_SKIPS"
GPU_MARK = "gpu"


def strict_skips_requested() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    """The root conftest's hook (it imports this function): strict skips when ``R3_STRICT_SKIPS`` is set."""
    if strict_skips_requested():
        config.pluginmanager.register(StrictSkips(), "r3-strict-skips")


class StrictSkips:
    """Collects every skip outside ``gpu`` tests and turns a passing run into a failing one."""

    def __init__(self) -> None:
        self.offenders: list[tuple[str, str]] = []

    def pytest_collectreport(self, report: Any) -> None:
        # a module-level skip (importorskip, pytest.skip(allow_module_level=True)) hides all of its tests
        if report.skipped:
            self.offenders.append((report.nodeid, _reason(report)))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        outcome = yield
        report = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker(GPU_MARK) is None:
            self.offenders.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.offenders and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.offenders:
            return
        terminalreporter.section(f"skipped outside '{GPU_MARK}' tests ({STRICT_ENV}=1 makes these failures)", red=True)
        for nodeid, reason in sorted(self.offenders):
            terminalreporter.line(f"{nodeid}: {reason}")
