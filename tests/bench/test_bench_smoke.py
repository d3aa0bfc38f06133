"""The GPU benchmark scripts run end to end on CPU (tiny model, Triton's interpreter), so a GPU call is
never spent finding a broken script. These are smoke runs: no timing here is checked or meaningful."""

import json

import pytest

from bench.roofline import Workload


def test_roofline_counts_weights_kv_and_logits(tiny_model_dir, tmp_path):
    from bench import roofline

    path = tiny_model_dir("tiny-qwen3-moe")
    mb = roofline.model_bytes(path)
    assert mb.weight_bytes == roofline.checkpoint_weight_bytes(path)
    assert mb.kv_bytes_per_token == 2 * 4 * 2 * 16 * 2  # bf16 checkpoint: K and V, 4 layers, 2 heads of 16
    # no token picks an expert at batch 0; all of them at a large batch
    assert mb.step_weight_bytes(0) == mb.weight_bytes - mb.embed_bytes - mb.expert_bytes
    assert mb.step_weight_bytes(10_000) == pytest.approx(mb.weight_bytes - mb.embed_bytes)
    w = Workload.parse("4x16+8")
    floor = roofline.workload_roofline(mb, w, bandwidth=1e12, flops=None)
    steps_bytes = (w.new_tokens - 1) * mb.decode_step_bytes(w.batch, w.prompt_len + w.new_tokens / 2)
    assert floor["decode_s"] == pytest.approx(steps_bytes / 1e12)
    with pytest.raises(ValueError, match="BATCHxPROMPT"):
        Workload.parse("4x16")
    assert roofline.main(["--model", str(path), "--workload", "4x16+8", "--json", str(tmp_path / "r.json")]) == 0
    assert "4x16+8" in json.loads((tmp_path / "r.json").read_text())["workloads"]


def test_throughput_quick_run_writes_its_table(tmp_path):
    from bench import rollout_throughput

    out = tmp_path / "t.json"
    assert rollout_throughput.main(["--quick", "--workload", "2x8+3", "--modes", "on/on", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (m,) = report["measurements"]
    assert (m["engine"], m["workload"], m["tokens"], m["note"]) == ("builtin", "2x8+3", 6, "")
    assert report["settings"]["builtin_config"]["dtype"] == "float32"
    stats = m["stats"]  # the timed call's steps: one prefill, then a decode step per further token
    assert stats["steps"] >= 3 and len(stats["slowest_steps"]) == 3
    assert all(s["seconds"] > 0 and s["requests"] <= 2 for s in stats["slowest_steps"])
    assert {s["tokens"] for s in stats["slowest_steps"]} <= {16, 2, 0}


def test_throughput_budget_skips_jobs_that_cannot_fit(tmp_path):
    from bench import rollout_throughput

    out = tmp_path / "t.json"
    assert rollout_throughput.main(["--quick", "--workload", "2x8+3", "--modes", "on/on", "--budget-s", "1",
                                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["measurements"] == [] and len(report["skipped"]) == 1


def test_kernel_checks_quick_run(tmp_path):
    pytest.importorskip("triton")
    from bench import kernels_microbench

    fallbacks = tmp_path / "fallbacks.json"
    assert kernels_microbench.main(["--quick", "--no-tune", "--fallbacks", str(fallbacks), "--json",
                                    str(tmp_path / "k.json")]) == 0
    report = json.loads((tmp_path / "k.json").read_text())
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    assert json.loads(fallbacks.read_text()) == {}


def test_decode_profile_quick_run(tmp_path):
    from bench import decode_profile

    assert decode_profile.main(["--quick", "--steps", "1", "--json", str(tmp_path / "p.json")]) == 0
    point = json.loads((tmp_path / "p.json").read_text())["points"]["4x16"]
    assert point["step_ms"] > 0 and point["groups_ms_per_step"]
