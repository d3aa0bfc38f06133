"""README.md cannot drift from the code: every Python block runs, every shell command it quotes is real.

Python blocks run as a user would paste them: each on its own, in an empty directory, with
nothing prepared (so a path a block uses must be made by the block itself).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


PYTHON = _blocks("python")
SHELL = _blocks("bash")


def test_the_readme_has_code_to_check():
    assert PYTHON and SHELL


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_in_an_empty_directory(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(PYTHON[index], f"README.md, Python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


def _commands() -> list[list[str]]:
    """Every command of the shell blocks, ``a && b`` split in two."""
    out = []
    for block in SHELL:
        for line in block.splitlines():
            for part in line.split("&&"):
                if part.strip():
                    out.append(shlex.split(part))
    return out


def test_ci_runs_exactly_the_readme_test_command():
    tests = [c for c in _commands() if "scripts/test.sh" in c]
    assert tests == [["bash", "scripts/test.sh"]]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/test.sh" in ci


def test_quick_start_commands_are_real(monkeypatch):
    """The torch pin matches CI's, every `r3` command is a subcommand and parses, and its recipe loads."""
    from recipes.cli import COMMANDS
    from recipes.config import load_recipe

    monkeypatch.chdir(REPO)  # where a user runs them after cloning
    commands = _commands()
    pins = {arg for c in commands if c[:2] == ["pip", "install"] for arg in c if arg.startswith("torch==")}
    assert pins and all(pin in (REPO / "scripts" / "test.sh").read_text() for pin in pins)
    r3 = [c[1:] for c in commands if c[0] == "r3"]
    assert r3, "the quick start runs r3"
    for args in r3:
        assert args[0] in COMMANDS
        if args[0] == "run":
            load_recipe(args[1])
