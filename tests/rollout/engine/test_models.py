"""The engine's own forward against transformers on the same checkpoint (fp32 unless stated)."""

import json

import pytest
import torch

from rollout.engine.engine import Engine
from rollout.presets import ENGINE_PRESETS
from rollout.types import SamplingParams

PROMPT = [5, 17, 300, 42, 7, 99, 123, 4, 250, 11, 3, 480]


def _hf(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _hf_router_topk(model, token_ids):
    """transformers' own top-k per (token, MoE layer), read off its router modules with hooks."""
    picks = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [m.register_forward_hook(lambda mod, args, out: picks.append(out[2])) for m in routers]
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picks, dim=1)  # [T, num_moe_layers, K]


@pytest.fixture(scope="module", params=ENGINE_PRESETS)
def family(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    return path, Engine(path, dtype="float32"), _hf(path)


def test_prefill_logits_match_transformers(family):
    path, engine, hf = family
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].float()
    assert (engine.prompt_logits(PROMPT) - ref).abs().max().item() <= 1e-4


def test_greedy_equals_transformers_generate_and_routes_equal_its_router(family):
    path, engine, hf = family
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=32, temperature=0))[0]
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.output_ids == ref[0, len(PROMPT):].tolist()

    routes = out.routed_experts
    assert routes.ids.shape == (len(PROMPT) + 32 - 1, len(engine.spec.moe_layers), engine.spec.top_k)
    native = _hf_router_topk(hf, PROMPT + out.output_ids[:-1])
    same_rows = (native.sort(-1).values == routes.to_torch().sort(-1).values).all(-1)
    agreement = same_rows.float().mean().item()
    print(f"{path.name}: routes equal transformers' router top-k on {agreement:.4%} of (token, layer) rows")
    assert agreement >= 0.999


def test_bf16_runs_close_to_transformers_bf16(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen2-moe")
    engine = Engine(path, dtype="bfloat16")
    with torch.no_grad():
        ref = _hf(path, torch.bfloat16)(torch.tensor([PROMPT])).logits[0].float()
    diff = (engine.prompt_logits(PROMPT) - ref).abs().max().item()
    print(f"bf16 max |dlogit| vs transformers: {diff:.3g}")
    assert diff < 0.05


def test_unsupported_family_is_named(tmp_path, tiny_model_dir):
    cfg = json.loads((tiny_model_dir("tiny-qwen3-moe") / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'deepseek_v3' is not supported by the built-in engine; supported: \['mixtral', 'qwen2_moe', 'qwen3_moe'\]"):
        Engine(tmp_path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        Engine(tmp_path)
