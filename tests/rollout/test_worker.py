"""``RolloutWorker``, the public entry point, on the built-in engine."""

import pytest

from rollout import Rollout, RolloutWorker, SamplingParams


def test_generate_returns_tokens_logprobs_and_routes(tiny_model_dir):
    with RolloutWorker(tiny_model_dir("tiny-qwen3-moe"), dtype="bfloat16") as worker:
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
        out = worker.generate(prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=7))
    assert [type(r) for r in out] == [Rollout, Rollout]
    for p, r in zip(prompts, out):
        assert r.prompt_ids == p and len(r.output_ids) == 4 and len(r.output_logprobs) == 4
        assert all(lp <= 0 for lp in r.output_logprobs)
        assert r.routed_experts.ids.shape == (len(p) + 4 - 1, 4, 2)
        r.routed_experts.validate()  # the engine skips validation on its hot path; the ids must still hold
        assert r.routed_experts.row_mask().all()


def test_per_prompt_sampling_and_start_len(tiny_model_dir):
    with RolloutWorker(tiny_model_dir("tiny-qwen3-moe"), overlap=False, max_running_requests=4) as worker:
        out = worker.generate(
            [[1, 2, 3], [1, 2, 3]],
            [SamplingParams(max_new_tokens=2, temperature=0), SamplingParams(max_new_tokens=3, temperature=0)],
            start_len=[0, 2],
        )
    assert [len(r.output_ids) for r in out] == [2, 3]
    assert out[0].output_ids == out[1].output_ids[:2]
    assert out[1].routed_experts.start == 2 and out[1].routed_experts.num_tokens == 3 + 3 - 1 - 2


def test_bad_construction_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        RolloutWorker(tiny_model_dir("tiny-qwen3-moe"), engine="vllm")
    with pytest.raises(ValueError, match="needs model_path"):
        RolloutWorker()
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['max_runing_requests'\]"):
        RolloutWorker(tiny_model_dir("tiny-qwen3-moe"), max_runing_requests=4)


def test_closing_frees_the_engine(tiny_model_dir):
    worker = RolloutWorker(tiny_model_dir("tiny-qwen3-moe"))
    with worker:
        worker.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert worker.backend.model is None and worker.backend.kv is None
    with pytest.raises(ValueError, match="engine is closed"):
        worker.generate([[1, 2]], SamplingParams(max_new_tokens=1))


def test_a_flat_prompt_list_is_told_the_expected_shape(tiny_model_dir):
    with RolloutWorker(tiny_model_dir("tiny-qwen3-moe")) as worker:
        with pytest.raises(ValueError, match=r"list of prompts, each a list of token ids, e\.g\. \[\[1, 2, 3\]"):
            worker.generate([1, 2, 3], SamplingParams(max_new_tokens=1))
        assert not worker.backend.has_unfinished()
