"""The end-to-end run's configuration, composed on CPU exactly as ``bench/verl_e2e/run.sh`` launches it.

``bench/verl_e2e/launch.py`` owns the command line; these tests compose its overrides through
verl's own Hydra config and ``validate_config``, convert the sections to verl's dataclasses,
load the model config (which imports the plugin through ``external_lib``) and the tokenizer,
read the parquet files through verl's ``RLHFDataset``, render a prompt with the token builder
verl's agent loop picks for ``qwen3_moe``, and load the reward through verl's own loader.
What needs the GPU (SGLang, Ray actors, CUDA IPC weight sync) is not run here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl 0.9.x is not installed (see trainer_bridge/verl/requirements-ci.txt)")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.main_ppo import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.workers.config import HFModelConfig  # noqa: E402

E2E = Path(__file__).resolve().parents[3] / "bench" / "verl_e2e"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"verl_e2e_{name}", E2E / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


launch, model_script, dataset_script = load("launch"), load("model"), load("dataset")


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl-e2e")
    model = model_script.make_model(root / "model")
    dataset_script.write(root / "data", train=16, val=4)
    return model, root / "data", root / "out"


def composed(mode: str, run_inputs, trainer: str = "v1"):
    model, data, out = run_inputs
    with initialize_config_dir(config_dir=str(launch.RECIPE_DIR), version_base=None):
        return compose(config_name=launch.RECIPE, overrides=launch.overrides(mode, model, data, out, trainer))


@pytest.mark.parametrize("trainer", launch.TRAINERS)
@pytest.mark.parametrize("mode", sorted(launch.MODES))
def test_launch_config_validates_in_verl(mode, trainer, run_inputs):
    cfg = composed(mode, run_inputs, trainer)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert not need_reference_policy(cfg) and not need_critic(cfg)  # GRPO without KL: actor and rollout only
    assert cfg.trainer.use_v1 is (trainer == "v1")

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.engine.router_replay.mode == launch.MODES[mode]
    assert actor.engine.strategy == "fsdp2" and not actor.engine.use_torch_compile

    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.name == "sglang" and rollout.calculate_log_probs
    # Both runs capture routes, so SGLang serves them identically; only the actor's replay differs.
    assert rollout.enable_rollout_routing_replay
    assert rollout.skip_tokenizer_init is False  # see trainer_bridge.verl.sglang_compat
    assert not rollout.free_cache_engine
    sglang_kwargs = OmegaConf.to_container(cfg.actor_rollout_ref.rollout.engine_kwargs.sglang)
    assert sglang_kwargs == {
        "attention_backend": "triton", "sampling_backend": "pytorch", "grammar_backend": "none", "enable_memory_saver": False,
    }  # fmt: skip
    # rollout_correction is on by default: verl logs rollout_corr/k3_kl whenever rollout log-probs come back.
    assert cfg.algorithm.rollout_correction is not None and not cfg.algorithm.rollout_correction.bypass_mode

    ray_init = OmegaConf.to_container(cfg.ray_kwargs.ray_init)
    assert ray_init["include_dashboard"] is False
    assert ray_init["runtime_env"]["env_vars"]["VERL_FILE_LOGGER_PATH"].endswith(launch.METRICS_NAME)


def test_model_config_loads_the_plugin_and_the_tokenizer(run_inputs):
    """What every worker and the SGLang server actor build first: HFModelConfig (imports external_lib)."""
    cfg = composed("R3", run_inputs)
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    assert "trainer_bridge.verl.plugin" in sys.modules
    assert model.hf_config.head_dim in (64, 128)  # SGLang's fallback rotary path
    assert model.hf_config.model_type == "qwen3_moe"
    assert len(model.tokenizer) == model.hf_config.vocab_size
    assert model.tokenizer.eos_token_id == model.hf_config.eos_token_id


def test_dataset_prompts_and_token_builder(run_inputs):
    """verl's RLHFDataset keeps every row and hands raw chat messages on; the agent loop's builder renders them."""
    from verl.trainer.ppo.utils import create_rl_dataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    cfg = composed("R3", run_inputs)
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    data = create_rl_dataset(cfg.data.train_files, cfg.data, model.tokenizer, None, is_train=True)
    assert len(data) == 16
    row = data[0]
    assert row["raw_prompt"][0]["role"] == "user" and row["data_source"] == load("reward").DATA_SOURCE

    builder = create_continuous_token_builder(model.tokenizer, hf_model_type=model.hf_config.model_type)
    assert type(builder).__name__ == "QwenContinuousTokenBuilder"
    ids = builder.build_initial_tokens(list(row["raw_prompt"]))
    assert 0 < len(ids) <= cfg.data.max_prompt_length
    assert model.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_reward_loads_through_verl_and_scores(run_inputs):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = composed("R3", run_inputs)
    score = get_custom_reward_fn(cfg)
    source = load("reward").DATA_SOURCE
    assert score(source, "the answer is 71", "71") == 1.0
    assert 0.0 < score(source, "7 and 1", "71") < 1.0
    assert score(source, "", "71") == 0.0
    with pytest.raises(ValueError, match="data_source"):
        score("openai/gsm8k", "71", "71")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        launch.overrides("R4", "m", "d", "o")
