"""Atomic writes: no moment without the target, and scratch from killed writers cleaned up by the next write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout.atomic import atomic_dir, atomic_write_bytes, scratch_paths

REPO = Path(__file__).resolve().parents[2]


def _write_dir(target: Path, marker: str) -> None:
    with atomic_dir(target) as tmp:
        (tmp / "marker").write_text(marker)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text(marker)


def test_atomic_dir_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"
    _write_dir(target, "one")
    _write_dir(target, "two")
    assert (target / "marker").read_text() == "two" and (target / "sub" / "x").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "marker").write_text("three")
            raise RuntimeError("writer failed")
    assert (target / "marker").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replacing_a_directory_has_no_window(tmp_path):
    """A reader polling the target in another process never finds it missing while it is replaced 300 times."""
    target = tmp_path / "model"
    _write_dir(target, "0")
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sys
            path, misses, reads = {str(target / 'marker')!r}, 0, 0
            sys.stdout.write("ready\\n"); sys.stdout.flush()
            while not os.path.exists(path + ".stop"):
                try:
                    open(path).read()
                except FileNotFoundError:
                    misses += 1
                reads += 1
            print(misses, reads)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    assert reader.stdout.readline() == "ready\n"
    for i in range(300):
        _write_dir(target, str(i + 1))
    (tmp_path / "model" / "marker.stop").touch()
    misses, reads = map(int, reader.communicate(timeout=60)[0].split())
    assert reads > 300 and misses == 0
    assert (target / "marker").read_text() == "300"


_KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import rollout.atomic as atomic
from pathlib import Path
target = Path({target!r})
if {directory!r}:
    with atomic.atomic_dir(target) as tmp:
        (tmp / "half").write_text("half written")
        print("ready", flush=True)
        time.sleep(600)
else:
    os.fsync = lambda fd: (print("ready", flush=True), time.sleep(600))  # stop between write and rename
    atomic.atomic_write_bytes(target, b"half written")
"""


@pytest.mark.parametrize("directory", [True, False])
def test_scratch_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, directory):
    target = tmp_path / ("model" if directory else "file.bin")
    if directory:
        _write_dir(target, "old")
    else:
        atomic_write_bytes(target, b"old")
    code = _KILLED_WRITER.format(repo=str(REPO), target=str(target), directory=directory)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "ready\n"
    (left,) = scratch_paths(target)  # the live writer's scratch is left alone by another write meanwhile...
    if directory:
        _write_dir(target, "meanwhile")
    else:
        atomic_write_bytes(target, b"meanwhile")
    assert scratch_paths(target) == [left]
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(30)
    assert left.exists()  # ...and a killed one leaves it behind
    assert (target / "marker").read_text() == "meanwhile" if directory else target.read_bytes() == b"meanwhile"
    if directory:
        _write_dir(target, "new")
        assert (target / "marker").read_text() == "new"
    else:
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new"
    assert scratch_paths(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
