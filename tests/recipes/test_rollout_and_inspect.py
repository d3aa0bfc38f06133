"""``r3 rollout`` and ``r3 inspect`` through the command line."""

from __future__ import annotations

import json
import shutil

import pytest

from rollout.rollout_file import load_rollouts, model_fingerprint


@pytest.mark.slow  # uses the session's small end-to-end run
def test_rollout_command(tmp_path, run_r3, small_run):
    model = small_run["model"]
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500], [9]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts) + "\n")
    proc = run_r3("rollout", "--model", str(model), "--prompts", "p.jsonl", "--out", "r.safetensors",
                  "--max-new-tokens", "4", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rollout" in proc.stderr  # the progress bar
    rollouts, header = load_rollouts(tmp_path / "r.safetensors")
    assert [r.prompt_ids for r in rollouts] == prompts
    for r in rollouts:
        assert len(r.output_ids) == len(r.output_logprobs) == 4
        assert r.routed_experts.ids.shape == (len(r.prompt_ids) + 4 - 1, 4, 2)
    assert header.model_fingerprint == model_fingerprint(model)
    assert header.meta["sampling"]["seed"] == 3


@pytest.mark.slow  # uses the session's small end-to-end run
def test_rollout_command_bad_prompts(tmp_path, run_r3, small_run):
    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": "abc"}\n')
    proc = run_r3("rollout", "--model", str(small_run["model"]), "--prompts", "p.jsonl", "--out", "r.safetensors",
                  cwd=tmp_path)
    assert proc.returncode == 2 and "p.jsonl:2: expected" in proc.stderr
    proc = run_r3("rollout", "--model", str(small_run["model"]), "--prompts", "nope.jsonl", "--out", "r.safetensors",
                  cwd=tmp_path)
    assert proc.returncode == 2 and "'nope.jsonl' does not exist" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def _fields(stdout: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in stdout.strip().splitlines())


@pytest.mark.slow  # uses the session's small end-to-end run
def test_inspect(tmp_path, run_r3, small_run):
    file = small_run["out"] / "rollouts.safetensors"
    proc = run_r3("inspect", str(file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = _fields(proc.stdout)
    assert (info["sequences"], info["generated_tokens"], info["top_k"], info["route_bytes_per_token"]) == (
        "8", "128", "2", "8.0")
    assert info["moe_layers"] == "[0, 1, 2, 3]" and info["route_dtype"] == "uint8"
    # With the model: the model's own fp32 routing, as in the run's native trainer forward.
    proc = run_r3("inspect", str(file), "--model", str(small_run["model"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = _fields(proc.stdout)["native_routing_agreement"]
    assert shown == f"{small_run['report']['native']['routing_agreement']:.4%}"


@pytest.mark.slow  # uses the session's small end-to-end run
def test_inspect_refuses_other_model_and_damage(tmp_path, run_r3, small_run):
    file = small_run["out"] / "rollouts.safetensors"
    other = tmp_path / "other"
    shutil.copytree(small_run["model"], other)
    weights = other / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-2] ^= 0x40
    weights.write_bytes(bytes(raw))
    proc = run_r3("inspect", str(file), "--model", str(other), cwd=tmp_path)
    assert proc.returncode == 2 and "do not belong to this model" in proc.stderr
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = run_r3("inspect", str(damaged), cwd=tmp_path)
    assert proc.returncode == 2 and "CRC32" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
