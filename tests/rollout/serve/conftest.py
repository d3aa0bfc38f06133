"""``r3 serve`` in a subprocess on 127.0.0.1, port chosen by the OS; stopped at the end of the module."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from recipes.commands.serve import LISTENING_PREFIX

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 120


class ServeProcess:
    def __init__(self, model: Path, *flags: str) -> None:
        cmd = [sys.executable, "-m", "recipes.cli", "serve", "--model", str(model), "--port", "0", *flags]
        # One intra-op thread: the test process computes beside the server on a small shared CPU.
        path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        line = first[0] if first else ""
        if not line.startswith(LISTENING_PREFIX):
            self.stop()
            raise RuntimeError(f"r3 serve did not start (stdout {line!r}): {self.stderr_text()[-2000:]}")
        self.url = line[len(LISTENING_PREFIX) :].strip()
        self.model = model

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def start_serve():
    started: list[ServeProcess] = []

    def start(model: Path, *flags: str) -> ServeProcess:
        started.append(ServeProcess(model, *flags))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The checkpoint a module serves (a module may override it with another preset)."""
    return tiny_model_dir("tiny-qwen3-moe")


@pytest.fixture(scope="module")
def engine(model):
    from rollout.engine.engine import Engine

    return Engine(model)
