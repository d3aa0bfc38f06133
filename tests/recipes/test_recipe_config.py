"""Recipe validation: one line naming the key, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipes.config import Recipe, RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]
MODEL = {"name": "tiny-qwen3-moe"}


def _error(raw: dict) -> str:
    with pytest.raises(ValueError) as info:
        parse_recipe(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_fill_in():
    recipe = parse_recipe({"model": MODEL})
    assert isinstance(recipe, Recipe)
    assert (recipe.rollout.engine, recipe.trainer.replay, recipe.rollout.sampling.temperature) == ("builtin", "r3", 1.0)


@pytest.mark.parametrize("raw, message", [
    ({"model": MODEL, "rollout": {"sampling": {"temperature": "hot"}}},
     "rollout.sampling.temperature: expected a number, got 'hot'"),
    ({"model": MODEL, "rollout": {"num_promts": 4}}, "rollout.num_promts: unknown key"),
    ({"model": MODEL, "extra": 1}, "extra: unknown key"),
    ({"model": MODEL, "rollout": {"overlap": "yes"}}, "rollout.overlap: expected true or false, got 'yes'"),
    ({"model": MODEL, "rollout": {"num_prompts": 2.5}}, "rollout.num_prompts: expected an integer, got 2.5"),
    ({"model": MODEL, "rollout": {"num_prompts": True}}, "rollout.num_prompts: expected an integer, got True"),
    ({"model": MODEL, "rollout": {"num_prompts": 0}}, "rollout.num_prompts: must be >= 1, got 0"),
    ({"model": MODEL, "trainer": {"replay": "r4"}}, "trainer.replay: expected one of off, r2, r3, got 'r4'"),
    ({"model": MODEL, "trainer": {"device": "gpu"}}, "trainer.device: expected"),
    ({"model": MODEL, "rollout": {"sampling": {"top_p": 0}}}, "rollout.sampling.top_p: must be in [1e-06, 1], got 0.0"),
    ({"model": MODEL, "rollout": {"sampling": {"stop_token_ids": [1, "x"]}}},
     "rollout.sampling.stop_token_ids: expected a list of integers"),
    ({"model": MODEL, "rollout": {"sampling": 3}}, "rollout.sampling: expected a mapping, got 3"),
    ({}, "model: missing (required)"),
    ({"model": {"seed": 1}}, "model.name: missing (required)"),
    ({"model": {"name": "no/such/model"}}, "model.name: 'no/such/model' is neither a preset"),
    ({"model": {"name": "tiny-qwen3-moe", "init": "sharp"}}, "model.init: expected one of preset, unit-scale"),
])
def test_errors_name_the_key(raw, message):
    assert message in _error(raw)


def test_errors_carry_the_key_apart_from_the_problem():
    """What lets `r3 rollout` name its flag instead of the key."""
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": MODEL, "rollout": {"sampling": {"max_new_tokens": 0}}})
    assert (info.value.key, info.value.problem) == ("rollout.sampling.max_new_tokens", "must be >= 1, got 0")


def test_checkpoint_path_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert parse_recipe({"model": {"name": str(tmp_path)}}).model.name == str(tmp_path)
    assert "model.init: 'unit-scale' applies to presets only" in _error({"model": {"name": str(tmp_path), "init": "unit-scale"}})


def test_overrides_and_out(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "rollout": {"num_prompts": 4}}))
    recipe = load_recipe(path, ["rollout.num_prompts=8", "rollout.sampling.temperature=0.5",
                                "rollout.sampling.stop_token_ids=[1, 2]", "rollout.sampling.seed=null"], out="o")
    assert recipe.rollout.num_prompts == 8 and recipe.rollout.sampling.temperature == 0.5
    assert recipe.rollout.sampling.stop_token_ids == [1, 2] and recipe.rollout.sampling.seed is None
    assert recipe.output.dir == "o"
    for override, message in [
        ("rollout.sampling.temperature=hot", "rollout.sampling.temperature: expected a number, got 'hot'"),
        ("rollout.nope=1", "rollout.nope: unknown key"),
        ("rollout.num_prompts.x=1", "rollout.num_prompts: expected a mapping"),
        ("novalue", "expected key=value"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(path, [override])


def test_yaml_off_is_a_string(tmp_path):
    # YAML 1.1 would read `off` as False; recipes use YAML 1.2 booleans (true/false only).
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: tiny-qwen3-moe}\ntrainer: {replay: off, guard: off}\n")
    recipe = load_recipe(path, ["rollout.overlap=false"])
    assert (recipe.trainer.replay, recipe.trainer.guard, recipe.rollout.overlap) == ("off", "off", False)
    assert load_recipe(path, ["trainer.replay=r2"]).trainer.replay == "r2"


def test_packaged_recipes_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the installed package's copy is used
    shipped = load_recipe(REPO / "recipes" / "tiny-moe.yaml")
    assert load_recipe("tiny-moe") == shipped == load_recipe("tiny-moe.yaml")
    (tmp_path / "tiny-moe.yaml").write_text(yaml.safe_dump({"model": MODEL, "output": {"dir": "mine"}}))
    assert load_recipe("tiny-moe.yaml").output.dir == "mine"  # a file of that name wins
    shipped_names = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert {"tiny-moe", "tiny-grpo"} <= set(shipped_names)
    with pytest.raises(ValueError, match=rf"recipe 'tiny-mo' does not exist: .*packaged recipe \({', '.join(shipped_names)}\)"):
        load_recipe("tiny-mo")


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"model": MODEL, "rollout": {"prompts": {"source": "jsonl"}}}))
    with pytest.raises(ValueError, match="rollout.prompts.path: required"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"model": MODEL, "rollout": {"prompts": {"source": "jsonl", "path": "x.jsonl"}}}))
    with pytest.raises(ValueError, match="rollout.prompts.path: 'x.jsonl' does not exist"):
        load_recipe(bad)


@pytest.mark.parametrize("name", ["tiny-moe.yaml", "bench-moe-gpu.yaml"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.trainer.replay == "r3"
