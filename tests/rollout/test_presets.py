"""Presets make loadable HF checkpoints with no download, deterministically from a seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rollout import MoESpec
from rollout.presets import PRESETS, init_model, make_config

TINY = sorted(p for p in PRESETS if p.startswith("tiny-"))


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_loads_and_trains(preset, tiny_model_dir):
    path = tiny_model_dir(preset)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert set(modes.values()) == {0o644}, f"checkpoint files get ordinary permissions: {modes}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    spec = MoESpec.from_pretrained(path)
    assert spec.num_experts == 8 and spec.top_k == 2 and spec.moe_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "gate" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "router weights must receive gradient"


def test_hub_layout_and_seed(tmp_path):
    a = init_model("tiny-qwen3-moe", tmp_path / "a", seed=3)
    b = init_model("tiny-qwen3-moe", tmp_path / "b", seed=3)
    c = init_model("tiny-qwen3-moe", tmp_path / "c", seed=4)
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb, \
            safe_open(c / "model.safetensors", "pt") as fc:
        key = "model.layers.0.mlp.experts.3.gate_proj.weight"  # one tensor per expert, as on the hub
        assert key in fa.keys()
        assert torch.equal(fa.get_tensor(key), fb.get_tensor(key))
        assert not torch.equal(fa.get_tensor(key), fc.get_tensor(key))
    assert json.loads((a / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_dense_layers_are_not_moe_layers(tiny_model_dir):
    assert MoESpec.from_pretrained(tiny_model_dir("tiny-qwen2-moe")).moe_layers == (1, 2, 3)
    assert MoESpec.from_pretrained(tiny_model_dir("tiny-deepseek-v3")).moe_layers == (1, 2)


def test_bench_preset_shape():
    """Qwen3-30B-A3B layer shapes with 12 layers: about 8.1B parameters (counted on the meta device)."""
    config = make_config("bench-qwen3-moe")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < params < 8.2e9
    spec = MoESpec.from_config(config)
    assert (spec.num_experts, spec.top_k, len(spec.moe_layers)) == (128, 8, 12)


def test_unknown_preset_and_atomic_failure(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        init_model("tiny-nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fixture_spec(sglang_fixture):
    spec = MoESpec.from_pretrained(sglang_fixture)
    assert spec == MoESpec("qwen3_moe", 4, (0, 1, 2, 3), 16, 4)


def test_unsupported_family_is_named():
    with pytest.raises(ValueError, match="unsupported model family 'llama'"):
        MoESpec.from_config({"model_type": "llama", "num_hidden_layers": 2})
