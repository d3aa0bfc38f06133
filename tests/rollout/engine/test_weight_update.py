"""``Engine.update_weights``: in place, equal to a fresh engine on the same weights, nothing stale, all-or-nothing.

Two checkpoints of one family (seed 0 and seed 1) play the old and the new weights. The
reference for every check is a *fresh* engine loaded from a checkpoint of the new weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rollout.engine.engine import Engine
from rollout.engine.models.loader import read_checkpoint_tensors
from rollout.engine.weights import engine_tensors
from rollout.presets import ENGINE_PRESETS
from rollout.types import SamplingParams

PROMPTS = [[5, 17, 300, 42, 7, 99, 123, 4], [250, 11, 3, 480, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0)
SAMPLED = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=i) for i in range(len(PROMPTS))]
SMALL = dict(kv_slots=512, max_running_requests=8, max_batch_tokens=256)



def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """What a transformers trainer holds: fused experts (``mlp.experts.gate_up_proj``), fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def _assert_same_rollouts(got, want, tol=1e-6):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        assert np.array_equal(g.routed_experts.ids, w.routed_experts.ids)
        assert g.routed_experts.start == w.routed_experts.start
        assert np.abs(np.asarray(g.output_logprobs) - np.asarray(w.output_logprobs)).max() <= tol


def _run(engine: Engine) -> list:
    return engine.generate(PROMPTS, GREEDY) + engine.generate(PROMPTS, SAMPLED)


@pytest.fixture(scope="module", params=ENGINE_PRESETS)
def pair(request, tiny_model_dir):
    return tiny_model_dir(request.param, 0), tiny_model_dir(request.param, 1)


@pytest.mark.parametrize("spelling", ["trainer_state_dict", "checkpoint_names"])
def test_update_equals_a_fresh_engine_on_the_new_weights(pair, spelling):
    old, new = pair
    engine = Engine(old, dtype="float32", **SMALL)
    before = _run(engine)
    weights = _state_dict(new) if spelling == "trainer_state_dict" else read_checkpoint_tensors(new)
    engine.update_weights(weights, version=1)
    got, want = _run(engine), _run(Engine(new, dtype="float32", **SMALL))
    _assert_same_rollouts(got, want)
    assert any(b.output_ids != g.output_ids for b, g in zip(before, got))  # the weights really changed
    assert engine.weight_version == 1 and all(r.weight_version == 1 for r in got)
    assert all(r.weight_version == 0 for r in before)


def test_bf16_update_from_fp32_trainer_weights_equals_a_fresh_bf16_engine(tiny_model_dir):
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="bfloat16", **SMALL)
    engine.update_weights(_state_dict(new), version="step-1")  # fp32 in, cast on copy
    _assert_same_rollouts(_run(engine), _run(Engine(new, dtype="bfloat16", **SMALL)), tol=0.0)
    assert engine.weight_version == "step-1"


def test_partial_update_equals_a_checkpoint_with_only_those_tensors_changed(pair, tmp_path):
    old, new = pair
    new_tensors = read_checkpoint_tensors(new)
    expert = next(k for k in new_tensors if ".experts.3." in k and ("gate_proj" in k or ".w1." in k))
    subset = {k: v for k, v in new_tensors.items() if k.startswith("model.layers.2.self_attn.k_proj")}
    subset[expert] = new_tensors[expert]  # one half of one expert's stacked gate_up
    subset["model.norm.weight"] = new_tensors["model.norm.weight"]
    mixed = _write_checkpoint(old, tmp_path / "mixed", {**read_checkpoint_tensors(old), **subset})
    engine = Engine(old, dtype="float32", **SMALL)
    engine.update_weights(list(subset.items()), version=7)  # an iterable of pairs works too
    _assert_same_rollouts(_run(engine), _run(Engine(mixed, dtype="float32", **SMALL)))


def test_no_cached_prefix_route_or_logprob_from_old_weights_is_served(tiny_model_dir):
    """Run prompts, update, run them (and extensions of them) again: every token, logprob and route
    must equal a fresh engine's. A single prefix-cache hit on old KV, or one old route row, fails it."""
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="float32", enable_prefix_cache=True, **SMALL)
    first = engine.generate(PROMPTS, GREEDY)
    assert engine.stats["cached_tokens"] > 0  # the cache holds old KV and routes
    extended = [r.token_ids for r in first]  # would reuse every cached token if the cache survived
    engine.update_weights(_state_dict(new), version=1)
    assert engine.stats["cached_tokens"] == 0
    hits = engine.stats["prefix_hit_tokens"]
    got = engine.generate(PROMPTS, GREEDY) + engine.generate(extended, GREEDY)
    fresh = Engine(new, dtype="float32", enable_prefix_cache=True, **SMALL)
    want = fresh.generate(PROMPTS, GREEDY) + fresh.generate(extended, GREEDY)
    _assert_same_rollouts(got, want)
    assert engine.stats["prefix_hit_tokens"] - hits == fresh.stats["prefix_hit_tokens"]  # hits on new KV only
    # the check can fail: the old weights route and score these very tokens differently
    stale = Engine(old, dtype="float32", **SMALL).generate(extended, GREEDY)
    assert any(not np.array_equal(s.routed_experts.ids, w.routed_experts.ids) for s, w in zip(stale, want[3:]))


def test_update_copies_into_the_existing_storage(tiny_model_dir):
    """CUDA graphs captured before an update read the weights' addresses: nothing may be rebound."""
    old, new = tiny_model_dir("tiny-qwen2-moe", 0), tiny_model_dir("tiny-qwen2-moe", 1)
    engine = Engine(old, dtype="float32", **SMALL)
    before = {k: (t, t.data_ptr()) for k, t in engine_tensors(engine.model.weights).items()}
    engine.update_weights(_state_dict(new), version=1)
    after = engine_tensors(engine.model.weights)
    assert after.keys() == before.keys()
    assert all(after[k] is t and after[k].data_ptr() == ptr for k, (t, ptr) in before.items())


def test_tied_embeddings_accept_the_shared_tensor_under_both_names(tmp_path):
    from transformers import AutoModelForCausalLM

    from rollout.presets import make_config

    config = make_config("tiny-qwen3-moe")
    config.tie_word_embeddings = True
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp_path / f"tied-{seed}")
        models.append(model)
    engine = Engine(tmp_path / "tied-0", dtype="float32", **SMALL)
    assert engine.model.weights.lm_head is engine.model.weights.embed
    state = models[1].state_dict()  # lists the one embedding as embed_tokens and as lm_head
    engine.update_weights(state, version=1)
    _assert_same_rollouts(_run(engine), _run(Engine(tmp_path / "tied-1", dtype="float32", **SMALL)))
    with pytest.raises(ValueError, match="lm_head.weight and model.embed_tokens.weight write the same engine weights"):
        engine.update_weights({"model.embed_tokens.weight": state["model.embed_tokens.weight"],
                               "lm_head.weight": state["lm_head.weight"].clone()}, version=2)


# ------------------------------------------------------------------ bad input
def _bad_updates(good: dict[str, torch.Tensor]) -> list[tuple[str, object, object, str]]:
    q = "model.layers.0.self_attn.q_proj.weight"
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    nan = good[q].clone()
    nan[0, 0] = float("nan")
    first_two = list(good.items())[:2]
    return [
        ("unknown name", {**good, "model.layers.0.mlp.experts.99.up_proj.weight": good[q]}, 1, "experts.99.up_proj.weight' is not a parameter"),
        ("wrong shape", {**good, q: good[q][:, :-1]}, 1, rf"{q}: shape \[64, 63\] does not match the model's \[64, 64\]"),
        ("integer dtype", {**good, q: good[q].to(torch.int32)}, 1, f"{q}: dtype int32 is not one of"),
        ("numpy array", {**good, q: good[q].numpy()}, 1, f"{q}: expected a torch.Tensor, got ndarray"),
        ("list", {**good, q: good[q].tolist()}, 1, f"{q}: expected a torch.Tensor, got list"),
        ("nan", {**good, q: nan}, 1, f"{q}: holds NaN or infinite values"),
        ("fused and per-expert", {**good, "model.layers.1.mlp.experts.2.up_proj.weight": good[fused][2, 32:]}, 1,
         "write the same engine weights"),
        ("name not a string", [*first_two, (3, good[q])], 1, "weight names must be strings"),
        ("not pairs", [*first_two, (q,)], 1, r"weights must be \(name, tensor\) pairs"),
        ("a tensor as weights", good[q], 1, "weights must be a mapping or an iterable"),
        ("None as weights", None, 1, "weights must be a mapping or an iterable"),
        ("bool version", good, True, "version must be an int or a non-empty str"),
        ("float version", good, 1.5, "version must be an int or a non-empty str"),
    ]


def test_every_bad_update_names_the_problem_changes_nothing_and_the_engine_still_serves(tiny_model_dir):
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="float32", **SMALL)
    reference = _run(engine)
    snapshot = {k: t.clone() for k, t in engine_tensors(engine.model.weights).items()}
    good = _state_dict(new)  # every bad update below is the good one plus one problem
    for label, weights, version, message in _bad_updates(good):
        with pytest.raises(ValueError, match=message):
            engine.update_weights(weights, version)
        current = engine_tensors(engine.model.weights)
        assert all(torch.equal(current[k], t) for k, t in snapshot.items()), f"{label}: weights changed"
        assert engine.weight_version == 0, label
    _assert_same_rollouts(_run(engine), reference)  # 1e-6: the rerun hits the prefix cache (not flushed)
    with pytest.raises(ValueError, match="in_flight must be one of"):
        engine.update_weights(good, 1, in_flight="later")


# ---------------------------------------------------------- requests in flight
def _start(engine: Engine, prompt: list[int], sampling: SamplingParams, min_tokens: int) -> int:
    """Queue one request and step until it has at least ``min_tokens`` output tokens."""
    rid = engine.add_request(prompt, sampling)
    while len(engine.progress(rid)[0]) < min_tokens:
        assert engine.step() == []
    return rid


def _collect(engine: Engine, rids: list[int]) -> dict:
    done = {}
    while set(rids) - done.keys():
        done.update(engine.step())
    return done


LONG = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)


def test_default_finishes_requests_in_flight_on_the_old_weights(tiny_model_dir):
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    alone = Engine(old, dtype="float32", **SMALL).generate([PROMPTS[0]], LONG)[0]
    engine = Engine(old, dtype="float32", **SMALL)
    rid = _start(engine, PROMPTS[0], LONG, min_tokens=4)
    engine.update_weights(_state_dict(new), version=1)
    assert not engine.has_unfinished()  # it finished inside the update ...
    finished = _collect(engine, [rid])[rid]  # ... and comes back from the next step()
    _assert_same_rollouts([finished], [alone], tol=0.0)
    assert finished.weight_version == 0 and finished.output_weight_versions == [0] * 16


def test_abort_mode_stops_requests_in_flight(tiny_model_dir):
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="float32", **SMALL)
    rid = _start(engine, PROMPTS[0], LONG, min_tokens=3)
    engine.update_weights(_state_dict(new), version=1, in_flight="abort")
    aborted = _collect(engine, [rid])[rid]
    assert aborted.finish_reason == "abort" and 3 <= len(aborted.output_ids) < 16
    assert aborted.weight_version == 0 and set(aborted.output_weight_versions) == {0}


@pytest.mark.parametrize("overlap", [True, False])
def test_continue_mode_records_versions_and_keeps_the_routes_that_sampled_old_tokens(tiny_model_dir, overlap):
    """A request retracted and resumed across an update (miles #3277): its old tokens keep their old
    logprobs *and* old routes; its new tokens, logprobs and routes are exactly those of the new weights."""
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    prompt, n = PROMPTS[0], LONG.max_new_tokens
    engine = Engine(old, dtype="float32", overlap=overlap, **SMALL)
    rid = _start(engine, prompt, LONG, min_tokens=5)
    engine.update_weights(_state_dict(new), version=1, in_flight="continue")
    got = _collect(engine, [rid])[rid]
    k = got.output_weight_versions.count(0)
    assert 5 <= k < n and got.output_weight_versions == [0] * k + [1] * (n - k) and got.weight_version == 1
    assert got.meta["preemptions"] == 1  # retracted once, at the update

    old_run = Engine(old, dtype="float32", **SMALL).generate([prompt], LONG)[0]
    cut = len(prompt) + k - 1  # route rows [0, cut) were computed by the old weights with those tokens
    assert got.output_ids[:k] == old_run.output_ids[:k]
    assert got.output_logprobs[:k] == old_run.output_logprobs[:k]
    assert np.array_equal(got.routed_experts.ids[:cut], old_run.routed_experts.ids[:cut])

    # the rest is the new weights' continuation of the same tokens (same seed: same noise per position)
    resumed = SamplingParams(max_new_tokens=n - k, temperature=1.0, seed=LONG.seed)
    new_run = Engine(new, dtype="float32", **SMALL).generate([prompt + got.output_ids[:k]], resumed)[0]
    assert got.output_ids[k:] == new_run.output_ids
    assert np.abs(np.asarray(got.output_logprobs[k:]) - np.asarray(new_run.output_logprobs)).max() <= 1e-6
    assert np.array_equal(got.routed_experts.ids[cut:], new_run.routed_experts.ids[cut:])
    # a recompute would have replaced the old rows with these: the check above can fail
    assert not np.array_equal(new_run.routed_experts.ids[:cut], old_run.routed_experts.ids[:cut])


def test_preempted_requests_finish_on_the_weights_that_started_them(tiny_model_dir):
    """A pool too small for every request preempts some; the default update drains them all on the old weights."""
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    sampling = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=i) for i in range(4)]
    prompts = [p * 2 for p in PROMPTS] + [PROMPTS[0]]
    alone = Engine(old, dtype="float32", **SMALL).generate(prompts, sampling)
    engine = Engine(old, dtype="float32", kv_slots=64, max_running_requests=4, max_batch_tokens=64)
    rids = [engine.add_request(p, s) for p, s in zip(prompts, sampling)]
    while engine.stats["preemptions"] == 0:
        engine.step()
    engine.update_weights(_state_dict(new), version=1)
    done = _collect(engine, rids)
    _assert_same_rollouts([done[r] for r in rids], alone)  # 1e-6: resumed requests recompute their prefix
    assert all(done[r].output_weight_versions == [0] * 24 for r in rids)


def test_version_of_a_request_added_after_an_update(tiny_model_dir):
    old, new = tiny_model_dir("tiny-qwen3-moe", 0), tiny_model_dir("tiny-qwen3-moe", 1)
    engine = Engine(old, dtype="float32", **SMALL)
    engine.update_weights(_state_dict(new), version="v1")
    engine.update_weights({}, version="v2")  # an empty update only bumps the version (and flushes)
    (r,) = engine.generate([PROMPTS[1]], GREEDY)
    assert r.weight_version == "v2" and r.output_weight_versions == ["v2"] * 10


def test_loader_names_a_missing_tensor_and_a_wrong_shape(tiny_model_dir, tmp_path):
    src = tiny_model_dir("tiny-mixtral", 0)
    tensors = read_checkpoint_tensors(src)
    missing = "model.layers.2.block_sparse_moe.experts.5.w3.weight"
    with pytest.raises(ValueError, match=f"checkpoint has no tensor '{missing}'"):
        Engine(_write_checkpoint(src, tmp_path / "missing", {k: v for k, v in tensors.items() if k != missing}))
    bad = dict(tensors, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \[3\] does not match the model's \[64\]"):
        Engine(_write_checkpoint(src, tmp_path / "shape", bad))
