"""``r3 train`` on a tiny setting (two steps, seconds): what each step measures, the weight sync, the outputs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml

from recipes.config import parse_recipe
from recipes.tasks import ResidueTask

TINY_TRAIN = {
    "model": {"name": "tiny-qwen3-moe", "init": "unit-scale", "seed": 0},
    "rollout": {"dtype": "bfloat16", "overlap": True, "num_prompts": 4, "max_running_requests": 16,
                "max_batch_tokens": 256, "kv_slots": 512, "prompts": {"length": 8}, "sampling": {"max_new_tokens": 8}},
    "trainer": {"dtype": "float32", "micro_batch_size": 4},
    # release and offload run on CPU too (the "host copy" is a second CPU tensor): the colocated GPU path, exercised
    "train": {"steps": 2, "group_size": 2, "arms": ["off", "r3"], "mini_batches": 2, "release_memory": True,
              "offload_weights": True},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from recipes.train_loop import run_training

    root = tmp_path_factory.mktemp("train")
    raw = json.loads(json.dumps(TINY_TRAIN))
    raw["model"]["dir"] = str(root / "models")
    raw["output"] = {"dir": str(root / "out")}
    lines: list[str] = []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # where tqdm and transformers draw their bars
        summary = run_training(parse_recipe(raw), progress=False, log=lines.append)
    records = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    return summary, records, root / "out", lines, stderr.getvalue()


def test_every_step_is_measured_and_synced(trained):
    summary, records, out, *_ = trained
    assert [(r["arm"], r["step"]) for r in records] == [("off", 0), ("off", 1), ("r3", 0), ("r3", 1)]
    for r in records:
        assert r["weight_version"] == r["step"]  # step s samples with the weights of s optimizer rounds
        assert r["sequences"] == 8 and r["generated_tokens"] == 64
        assert 0 <= r["reward"] <= 1 and r["grad_norm"] > 0 and 0 <= r["clip_fraction"] <= 1
        assert min(r[k] for k in ("time_rollout", "time_trainer", "time_weight_sync", "time_memory")) > 0
    native, r3 = records[:2], records[2:]
    assert native[0]["reward"] == r3[0]["reward"]  # both arms start from the same weights and seeds
    assert all(r["routing_agreement"] == 1.0 for r in r3)  # ids observed at the experts, not from replay's code
    assert all(r["k3_kl_native_same_rollouts"] == r["k3_kl"] for r in native)
    assert all(r["k3_kl"] < r["k3_kl_native_same_rollouts"] for r in r3)  # paired: replay lowers the mismatch
    assert all(r["routing_agreement"] < 1.0 for r in native)  # bf16 engine vs fp32 trainer: near-ties flip
    assert all(r["replay_overlap_min"] is None for r in native) and all(r["replay_overlap_min"] > 0 for r in r3)
    assert summary["checks"]["r3_routing_agreement_100"] == {"steps": 2, "of": 2, "every_step": True}


def test_no_progress_silences_every_bar(trained):
    """The run made the model ("Writing model shards") and loaded it in transformers ("Loading weights")."""
    *_, stderr = trained
    assert "%|" not in stderr, stderr


def test_outputs_are_written_atomically(trained):
    summary, records, out, lines, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "report.json", "report.md", "report.png"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert json.loads((out / "report.json").read_text())["checks"] == summary["checks"]
    text = (out / "report.md").read_text()
    assert "| step | native reward" in text and "R3 agreement" in text
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("check r3_k3_kl_below_native" in line for line in lines)


def test_residue_task_scores_the_rule_exactly():
    task = ResidueTask(modulus=4, vocab_size=512)
    assert task.reward([7, 9], [13, 17, 2, 6]) == 0.75  # 9->13 ok, 13->17 ok, 17->2 no, 2->6 ok
    assert task.reward([1], []) == 0.0
    prompts = task.prompts(3, 5, seed=1)
    assert prompts == task.prompts(3, 5, seed=1) and len(prompts) == 3 and all(len(p) == 5 for p in prompts)
    with pytest.raises(ValueError, match="train.modulus: must be in"):
        ResidueTask(modulus=1, vocab_size=512)


@pytest.mark.parametrize("override, message", [
    ("train.arms=[off, off]", "train.arms: expected distinct routing modes"),
    ("train.arms=[native]", "train.arms: expected one of off, r2, r3, got 'native'"),
    ("train.release_memory=false", "train.offload_weights: needs train.release_memory: true"),
    ("train.group_size=1", "train.group_size: must be >= 2"),
])
def test_bad_train_keys_are_named_before_anything_runs(tmp_path, run_r3, override, message):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    proc = run_r3("train", "t.yaml", "--set", override, "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml"]
