"""The verl recipes compose through verl's own Hydra config and convert to verl's config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from verl_stack import require

require("hydra", "verl.trainer.main_ppo", "verl.utils.config")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl.trainer.main_ppo import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "verl"


def load(name: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name=name)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b-grpo-r3", "bench-qwen3-moe-1gpu-r3"])
def test_recipe_loads_through_verls_config_system(name):
    cfg = load(name)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert type(actor).__name__ == "FSDPActorConfig"
    assert actor.engine.router_replay.mode == "R3"  # what the plugin reads on the FSDP engine
    assert actor.engine.ulysses_sequence_parallel_size == 1

    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.name == "sglang"
    assert rollout.enable_rollout_routing_replay  # verl then starts SGLang with enable_return_routed_experts
    assert rollout.skip_tokenizer_init is False  # verl 0.9.1 + SGLang 0.5.17: see trainer_bridge.verl.sglang_compat

    assert cfg.actor_rollout_ref.model.external_lib == "trainer_bridge.verl.plugin"
    assert cfg.algorithm.adv_estimator == "grpo"
    # Every parameter of verl's ppo_trainer.yaml is still there: the recipe only overrides.
    assert "ppo_epochs" in cfg.actor_rollout_ref.actor and "n" in cfg.actor_rollout_ref.rollout


def test_one_gpu_recipe_fits_one_gpu():
    cfg = load("bench-qwen3-moe-1gpu-r3")
    assert cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes == 1
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
