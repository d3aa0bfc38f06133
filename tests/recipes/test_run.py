"""``r3 run``: the acceptance properties on a small setting, atomic output, nothing written for a bad recipe."""

from __future__ import annotations

import re
import signal

import pytest
import torch

import yaml

from recipes.config import parse_recipe
from rollout.rollout_file import load_rollouts, model_fingerprint


@pytest.mark.slow
def test_replay_fixes_routing_and_shrinks_mismatch(small_run):
    report = small_run["report"]
    native, replay = report["native"], report["replay"]
    assert native["routing_agreement"] < 1.0  # bf16 rollout vs fp32 trainer: some near-ties flip
    assert replay["routing_agreement_per_layer"] == [1.0] * len(replay["routing_agreement_per_layer"])
    assert replay["routing_agreement"] == 1.0
    assert replay["k3_kl"] < native["k3_kl"]
    assert replay["mean_abs_logprob_diff"] < native["mean_abs_logprob_diff"]
    assert native["tokens"] == replay["tokens"] == 8 * 16
    rollout = report["rollout"]
    assert rollout["tokens_per_second"] > 0
    assert rollout["route_bytes_per_token"] == 4 * 2  # 4 MoE layers x top-2 x uint8
    assert rollout["route_rows"] == 8 * (16 + 16 - 1)


@pytest.mark.slow
def test_outputs_and_table(small_run):
    out = small_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png", "rollouts.safetensors"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no scratch dir left
    rollouts, header = load_rollouts(out / "rollouts.safetensors")
    assert len(rollouts) == 8 and all(len(r.output_ids) == 16 for r in rollouts)
    assert header.model_fingerprint == model_fingerprint(small_run["model"])
    assert header.meta["recipe"]["trainer"]["replay"] == "r3"
    stdout = small_run["proc"].stdout
    assert "routing agreement" in stdout and "k3 KL" in stdout and "100.0000%" in stdout
    assert "![per-layer agreement" in (out / "report.md").read_text()


def test_bad_recipe_writes_nothing(tmp_path, run_r3, small_recipe):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        dict(small_recipe, rollout=dict(small_recipe["rollout"], sampling={"temperature": "hot"}))))
    (tmp_path / "nomodel.yaml").write_text(yaml.safe_dump(dict(small_recipe, model={"name": "./missing-model"})))
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(dict(small_recipe, trainer={"replays": "r3"})))
    (tmp_path / "prompts.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [-1]}\n')
    (tmp_path / "badprompt.yaml").write_text(yaml.safe_dump(dict(
        small_recipe, rollout={"prompts": {"source": "jsonl", "path": "prompts.jsonl"}})))
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, message in [
        ("bad.yaml", "rollout.sampling.temperature: expected a number, got 'hot'"),
        ("nomodel.yaml", "model.name: './missing-model' is neither a preset"),
        ("unknown.yaml", "trainer.replays: unknown key"),
        ("badprompt.yaml", "prompts.jsonl:2: expected"),  # read before the model is made
    ]:
        proc = run_r3("run", name, cwd=tmp_path)
        assert proc.returncode == 2
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_r3("run", "bad.yaml", "--set", "rollout.sampling.temperature=0.7", "--set", "trainer.replay=r5",
                  cwd=tmp_path)
    assert proc.returncode == 2 and "trainer.replay: expected one of off, r2, r3, got 'r5'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no models/, no runs/, no scratch


@pytest.mark.slow
def test_interrupted_run_leaves_previous_output(tmp_path, r3_popen, small_run, small_recipe):
    recipe = dict(small_recipe, model={"name": str(small_run["model"])})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier run")
    proc = r3_popen("run", "r.yaml", "--out", "out", "--no-progress", cwd=tmp_path)
    line = proc.stdout.readline()  # printed inside the scratch directory's lifetime, before the rollout
    assert line.startswith("model "), line + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # scratch directory removed


@pytest.mark.slow
def test_r2_and_off_modes(small_run, small_recipe):
    """The trainer half of the run on the small run's rollouts: R2 replays the trainer's own routes."""
    from recipes.pipeline import trainer_logprobs
    from trainer_bridge.metrics import routing_agreement

    rollouts, _ = load_rollouts(small_run["out"] / "rollouts.safetensors")
    small_recipe["model"] = {"name": str(small_run["model"])}
    results = {}
    for mode in ("r2", "off"):
        recipe = parse_recipe(dict(small_recipe, trainer=dict(small_recipe["trainer"], replay=mode)))
        results[mode] = trainer_logprobs(small_run["model"], recipe, rollouts[:4])
    r2, off = results["r2"], results["off"]
    # R2 reproduces native routing exactly (not the rollout's), so its logprobs are the native ones.
    assert (r2["replay_routes"] == r2["native_routes"]).all()
    assert abs(r2["replay_logp"] - r2["native_logp"]).max() < 1e-5
    assert float(routing_agreement(r2["native_routes"], r2["rollout_routes"]).mean()) < 1.0
    assert off["replay_logp"] is None and off["replay_routes"] is None
    assert (off["native_logp"] == r2["native_logp"]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_small_run_on_cuda(tmp_path, small_recipe):
    from recipes.pipeline import run_recipe

    small_recipe["model"]["dir"] = str(tmp_path / "models")
    small_recipe["rollout"]["device"] = small_recipe["trainer"]["device"] = "cuda"
    small_recipe["output"] = {"dir": str(tmp_path / "out")}
    report = run_recipe(parse_recipe(small_recipe), progress=False, log=lambda line: None)
    assert report["replay"]["routing_agreement"] == 1.0
    assert report["replay"]["mean_abs_logprob_diff"] < report["native"]["mean_abs_logprob_diff"]
    assert report["replay"]["k3_kl"] < report["native"]["k3_kl"]


@pytest.mark.slow
def test_no_progress_silences_every_bar(small_run):
    """The small run made the demo model ("Writing model shards") and loaded it in transformers ("Loading weights")."""
    assert not re.search(r"\d+%\|", small_run["proc"].stderr), small_run["proc"].stderr


@pytest.mark.slow
def test_bars_count_generated_tokens_and_trainer_forwards(small_run, small_recipe, monkeypatch, capsys):
    """Sequences of one batch all finish on the last steps; a bar of finished sequences would sit at 0% then jump."""
    from tqdm import tqdm

    import recipes.progress
    from recipes.pipeline import generate, trainer_logprobs

    def every_update(desc: str, total: int, unit: str, enabled: bool) -> tqdm:
        """The same bar, redrawn on every update (tqdm otherwise waits 0.1 s), so the test sees each count."""
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0, miniters=1)

    monkeypatch.setattr(recipes.progress, "bar", every_update)
    small_recipe["model"] = {"name": str(small_run["model"])}
    small_recipe["rollout"]["sampling"]["max_new_tokens"] = 5
    recipe = parse_recipe(small_recipe)
    rollouts, _ = generate(small_run["model"], recipe, [[1, 2, 3], [4, 5], [6]], progress=True)
    trainer_logprobs(small_run["model"], recipe, rollouts, progress=True)
    err = capsys.readouterr().err
    rollout_counts = [int(n) for n in re.findall(r"rollout:[^\r\n]*?(\d+)/15 ", err)]
    assert rollout_counts[-1] == 15 and len(set(rollout_counts)) >= 5, err  # 3 tokens a step: 0, 3, 6, ..., 15
    assert rollout_counts == sorted(rollout_counts)
    assert "tok/s" in err or "s/tok" in err
    trainer_counts = [int(n) for n in re.findall(r"trainer:[^\r\n]*?(\d+)/2 ", err)]  # one micro-batch, native + replay
    assert trainer_counts[-1] == 2 and set(trainer_counts) == {0, 1, 2}, err


@pytest.mark.parametrize("rollout, message", [
    ({"prompts": {"length": 2048}}, "r3 run: error: rollout.prompts.length: prompt of 2048 tokens does not fit the model's context of 2048"),
    ({"prompts": {"source": "jsonl", "path": "p.jsonl"}}, "r3 run: error: p.jsonl:2: token id 999 is outside the model's vocabulary [0, 512)"),
])
def test_prompts_the_model_cannot_take_fail_before_the_model_is_made(tmp_path, monkeypatch, capsys, small_recipe, rollout, message):
    from recipes.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [3, 999]}\n')
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(small_recipe, rollout=rollout)))
    assert main(["run", "r.yaml", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.yaml"]  # no models/, no runs/
