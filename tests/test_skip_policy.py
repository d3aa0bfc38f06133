"""CI's skip policy, run for real: pytest in a scratch folder with this repository's config and root conftest.

Skip reasons are always shown; with ``R3_STRICT_SKIPS=1`` (set by ``.ci/run``) any skip outside
``gpu`` tests, module-level skips included, fails the run and is listed with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skip_policy import STRICT_ENV

REPO = Path(__file__).resolve().parents[1]

TESTS = {
    "test_mixed.py": """
        import pytest

        def test_runs():
            pass

        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="needs CUDA")
        def test_on_gpu():
            pass

        def test_needs_optional_thing():
            pytest.skip("optional thing is missing")

        @pytest.mark.xfail(reason="known", strict=True)
        def test_expected_failure():
            raise AssertionError
    """,
    "test_module_skip.py": """
        import pytest

        pytest.importorskip("r3_no_such_module", reason="r3_no_such_module is not installed")

        def test_hidden():
            pass
    """,
}

# The scratch folder's conftest takes the same hook as the repository's root conftest.
CONFTEST = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from skip_policy import pytest_configure
"""


def test_the_root_conftest_uses_this_policy():
    """Loaded by path: several folders' conftests are all named ``conftest``."""
    import skip_policy

    spec = importlib.util.spec_from_file_location("r3_root_conftest", REPO / "tests" / "conftest.py")
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)
    assert root.pytest_configure is skip_policy.pytest_configure


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[bool, subprocess.CompletedProcess]:
    """The scratch suite run twice at once, plain and strict."""
    folder = tmp_path_factory.mktemp("skip_policy")
    (folder / "conftest.py").write_text(CONFTEST)
    for name, source in TESTS.items():
        (folder / name).write_text(textwrap.dedent(source))
    procs = {strict: start_pytest(folder, strict) for strict in (False, True)}
    out = {}
    for strict, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[strict] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def start_pytest(folder: Path, strict: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != STRICT_ENV}
    if strict:
        env[STRICT_ENV] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(folder),
         "-p", "no:cacheprovider"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_skip_reasons_are_shown_and_a_plain_run_passes(runs):
    proc = runs[False]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "optional thing is missing" in proc.stdout  # the repository's addopts show skip reasons
    assert "r3_no_such_module is not installed" in proc.stdout
    assert "needs CUDA" in proc.stdout


def test_strict_run_fails_on_skips_outside_gpu_tests_only(runs):
    proc = runs[True]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    section = proc.stdout.split(f"skipped outside 'gpu' tests ({STRICT_ENV}=1", 1)[1]
    listed = [line for line in section.splitlines()[1:] if line.startswith("test_")]
    # the gpu test's skip and the xfail are not offences
    assert listed == [
        "test_mixed.py::test_needs_optional_thing: optional thing is missing",
        "test_module_skip.py: r3_no_such_module is not installed",
    ], section
