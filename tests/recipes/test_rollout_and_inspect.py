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
    assert "rollout: 100%" in proc.stderr and "12/12" in proc.stderr  # the bar counts tokens: 3 prompts x 4
    assert "engine load not included" in proc.stdout
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
    assert proc.returncode == 2 and "--prompts: 'nope.jsonl' does not exist" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.mark.slow  # uses the session's small end-to-end run
@pytest.mark.parametrize("args, message", [
    (["--model", "models/nope"], "r3 rollout: error: --model: 'models/nope' is not a checkpoint directory"),
    (["--max-new-tokens", "0"], "r3 rollout: error: --max-new-tokens: must be >= 1, got 0"),
    (["--top-p", "1.5"], "r3 rollout: error: --top-p: must be in "),  # the range is SamplingParams' to state
    (["--device", "gpu"], "r3 rollout: error: --device: expected cpu|cuda"),
    (["--prompts", "vocab.jsonl"], "r3 rollout: error: vocab.jsonl:2: token id 512 is outside the model's vocabulary [0, 512)"),
    (["--prompts", "long.jsonl"], "r3 rollout: error: long.jsonl:1: prompt of 2048 tokens does not fit the model's context of 2048"),
])
def test_rollout_errors_name_the_flag_and_come_before_the_engine(tmp_path, monkeypatch, capsys, small_run, args, message):
    """In-process (the command line itself is exercised above): one error line, no bar drawn, nothing written."""
    from recipes.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2]}\n')
    (tmp_path / "vocab.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [3, 512]}\n')
    (tmp_path / "long.jsonl").write_text(json.dumps({"input_ids": [1] * 2048}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    base = {"--model": str(small_run["model"]), "--prompts": "p.jsonl", "--out": "r.safetensors"}
    base.update(zip(args[::2], args[1::2]))
    assert main(["rollout", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err  # no bar drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == before


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
    proc = run_r3("inspect", str(file), "--model", str(small_run["model"]), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%|" not in proc.stderr  # --no-progress silences transformers' "Loading weights" bar too
    fields = _fields(proc.stdout)
    headline, definition = fields["native_routing_agreement"].split("  ", 1)
    assert headline == f"{small_run['report']['native']['routing_agreement']:.4%}"
    assert definition.startswith("(token-weighted: share of all routed (token, MoE layer) rows")
    per_layer, definition = fields["native_routing_agreement_per_layer"].split("  ", 1)
    layers = [float(x.strip("%")) / 100 for x in per_layer.strip("[]").split(", ")]
    assert per_layer == "[" + ", ".join(f"{x:.4%}" for x in small_run["report"]["native"]["routing_agreement_per_layer"]) + "]"
    # every layer has the same routed rows, so the token-weighted headline is also the layer mean
    assert abs(sum(layers) / len(layers) - float(headline.strip("%")) / 100) < 1e-5


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


@pytest.mark.slow  # uses the session's small end-to-end run
def test_init_model_makes_the_recipes_demo_model(tmp_path, capsys, small_run):
    """`r3 inspect --model` accepts a self-made demo model: same preset, init and seed give the same checkpoint."""
    from recipes.cli import main

    assert main(["init-model", "--preset", "tiny-qwen3-moe", "--init", "unit-scale", "--seed", "0",
                 "--out", str(tmp_path / "mine"), "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err  # no "Writing model shards" bar
    assert model_fingerprint(tmp_path / "mine") == model_fingerprint(small_run["model"])
    assert main(["init-model", "--preset", "tiny-qwen3-moe", "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    assert model_fingerprint(tmp_path / "plain") != model_fingerprint(small_run["model"])
    for model in ("mine", "plain"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / model).iterdir()}
        assert modes == dict.fromkeys(["config.json", "generation_config.json", "model.safetensors"], 0o644), modes
