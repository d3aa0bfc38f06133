"""The recipe schema: what ``r3 run`` reads from YAML, validated before anything runs.

The schema is the dataclasses below (types, defaults, constraints); what each
key means is written once, in ``docs/recipes.md``, whose table a test checks
against this schema. A recipe is a YAML mapping of the same shape; every key is
optional except ``model.name``. A problem is one ``ValueError`` line naming the key, e.g.
``rollout.sampling.temperature: expected a number, got 'hot'``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from rollout.engine.config import DTYPES

REPLAY_MODES = ("off", "r2", "r3")
GUARD_MODES = ("off", "warn", "raise")
INIT_MODES = ("preset", "unit-scale")
ENGINES = ("builtin",)  # engine="sglang" needs a server URL: not runnable from a recipe yet
PROMPT_SOURCES = ("synthetic", "jsonl")
TRAIN_ARMS = REPLAY_MODES  # r3 train: one arm per routing mode ("off" = native routing)
TRAIN_TASKS = ("residue",)  # recipes/tasks.py
DEVICE_PATTERN = r"cpu|cuda(:[0-9]+)?"
# Recipes that ship inside the package, found by name: `r3 run tiny-moe`.
PACKAGED_RECIPES = Path(__file__).resolve().parent


class RecipeError(ValueError):
    """A bad recipe value: ``key`` is the dotted recipe key, ``problem`` what is wrong with it.

    Kept apart so a command that builds a recipe from its flags can name the flag the user
    typed (``--model: ...``) instead of the key (``model.name: ...``).
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _key(default: Any = dataclasses.MISSING, *, choices: tuple = (), minimum: float | None = None,
         pattern: str | None = None, factory: Any = None) -> Any:
    """A recipe key's default and constraints; what it means is documented in docs/recipes.md only."""
    meta = {"choices": choices, "minimum": minimum, "pattern": pattern}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key()
    seed: int = _key(0, minimum=0)
    init: str = _key("preset", choices=INIT_MODES)
    dir: str = _key("models")


@dataclass(frozen=True)
class PromptConfig:
    source: str = _key("synthetic", choices=PROMPT_SOURCES)
    path: str | None = _key(None)
    length: int = _key(16, minimum=1)
    seed: int = _key(0, minimum=0)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = _key(32, minimum=1)
    temperature: float = _key(1.0, minimum=0)
    top_p: float = _key(1.0, minimum=0)
    top_k: int = _key(-1, minimum=-1)
    seed: int | None = _key(0, minimum=0)
    stop_token_ids: list[int] = _key(factory=list)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = _key("builtin", choices=ENGINES)
    device: str = _key("cpu", pattern=DEVICE_PATTERN)
    dtype: str = _key("bfloat16", choices=DTYPES)
    overlap: bool = _key(True)
    max_running_requests: int = _key(64, minimum=1)
    max_batch_tokens: int = _key(2048, minimum=1)
    kv_slots: int = _key(16384, minimum=1)
    num_prompts: int = _key(32, minimum=1)
    prompts: PromptConfig = _key(factory=PromptConfig)
    sampling: SamplingConfig = _key(factory=SamplingConfig)


@dataclass(frozen=True)
class TrainerConfig:
    device: str = _key("cpu", pattern=DEVICE_PATTERN)
    dtype: str = _key("float32", choices=DTYPES)
    micro_batch_size: int = _key(8, minimum=1)
    replay: str = _key("r3", choices=REPLAY_MODES)
    guard: str = _key("warn", choices=GUARD_MODES)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _key(40, minimum=1)
    group_size: int = _key(8, minimum=2)
    arms: list[str] = _key(factory=lambda: list(TRAIN_ARMS), choices=TRAIN_ARMS)
    task: str = _key("residue", choices=TRAIN_TASKS)
    modulus: int = _key(4, minimum=2)
    learning_rate: float = _key(0.003, minimum=0)
    mini_batches: int = _key(2, minimum=1)
    clip_ratio: float = _key(0.2, minimum=0)
    clip_ratio_c: float = _key(3.0, minimum=1)
    max_grad_norm: float = _key(1.0, minimum=0)
    release_memory: bool = _key(False)
    offload_weights: bool = _key(False)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _key("runs/r3")


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = _key()
    rollout: RolloutConfig = _key(factory=RolloutConfig)
    trainer: TrainerConfig = _key(factory=TrainerConfig)
    output: OutputConfig = _key(factory=OutputConfig)
    train: TrainConfig = _key(factory=TrainConfig)


# ------------------------------------------------------------------- parsing
class _Yaml12Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false. YAML 1.1 reads `replay: off` as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def load_recipe(path: str | os.PathLike, overrides: typing.Sequence[str] = (), out: str | None = None) -> Recipe:
    """Read, override (``key=value``, value in YAML syntax) and validate a recipe file (or a packaged recipe's name)."""
    path = find_recipe(path)
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    if out is not None:
        raw.setdefault("output", {})
        if not isinstance(raw["output"], dict):
            raise RecipeError("output", "expected a mapping")
        raw["output"]["dir"] = out
    recipe = parse_recipe(raw)
    check_prompt_source(recipe)
    return recipe


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml"))


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe file path as given, else the packaged recipe of that name (``tiny-moe`` or ``tiny-moe.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        packaged = PACKAGED_RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
        if packaged.is_file():
            return packaged
    raise ValueError(
        f"recipe {str(name)!r} does not exist: give a YAML file or a packaged recipe ({', '.join(packaged_recipes())})"
    )


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` sets ``raw["a"]["b"]["c"]``; the value is parsed as YAML (``0.5``, ``true``, ``[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value")
    parts = key.strip().split(".")
    try:
        value = _yaml(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(".".join(parts[: depth + 1]), f"expected a mapping, cannot set {key}")
    node[parts[-1]] = value


def parse_recipe(raw: Mapping[str, Any]) -> Recipe:
    recipe = _parse(Recipe, raw, "")
    _check_model(recipe.model)
    sampling_params(recipe.rollout.sampling)
    _check_train(recipe.train)
    return recipe


def _check_train(train: TrainConfig) -> None:
    if not train.arms or len(set(train.arms)) != len(train.arms):
        raise ValueError(f"train.arms: expected distinct routing modes ({', '.join(TRAIN_ARMS)}), got {train.arms!r}")
    if train.offload_weights and not train.release_memory:
        raise ValueError("train.offload_weights: needs train.release_memory: true")


def sampling_params(sampling: SamplingConfig) -> Any:
    """The engine's ``SamplingParams`` (without per-prompt seeds); its own checks name the recipe section."""
    from rollout.types import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=sampling.seed, stop_token_ids=tuple(sampling.stop_token_ids),
        )
    except ValueError as exc:
        # SamplingParams names its field first ("top_p must be in (0, 1], ..."): name the recipe key instead
        name, _, rest = str(exc).partition(" ")
        if name in {f.name for f in dataclasses.fields(SamplingConfig)}:
            raise RecipeError(f"rollout.sampling.{name}", rest) from None
        raise RecipeError("rollout.sampling", str(exc)) from None


def _parse(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise RecipeError(where or "recipe", f"expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise RecipeError(_join(where, str(key)), f"unknown key (known keys here: {known})")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = _value(hints[name], raw[name], key, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(key, "missing (required)")
    return cls(**values)


def _value(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if optional:
        if value is None:
            return None
        hint = next(a for a in hint.__args__ if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(key, f"expected true or false, got {_show(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(key, f"expected an integer, got {_show(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(key, f"expected a number, got {_show(value)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise RecipeError(key, f"expected a string, got {_show(value)}")
    elif typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item) for v in value):
            raise RecipeError(key, f"expected a list of {'integers' if item is int else 'strings'}, got {_show(value)}")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"{key}: unsupported schema type {hint}")
    for v in value if isinstance(value, list) else [value]:
        if meta.get("choices") and v not in meta["choices"]:
            raise RecipeError(key, f"expected one of {', '.join(meta['choices'])}, got {_show(v)}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise RecipeError(key, f"expected {meta['pattern']}, got {_show(value)}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise RecipeError(key, f"must be >= {meta['minimum']}, got {_show(value)}")
    return value


def _check_model(model: ModelConfig) -> None:
    from rollout.presets import PRESETS

    if model.name in PRESETS:
        return
    if model.init != "preset":
        raise RecipeError("model.init", f"{model.init!r} applies to presets only, {model.name!r} is a checkpoint")
    if not (Path(model.name) / "config.json").is_file():
        raise RecipeError(
            "model.name", f"{model.name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint directory"
        )


def check_prompt_source(recipe: Recipe) -> None:
    prompts = recipe.rollout.prompts
    if prompts.source == "jsonl":
        if prompts.path is None:
            raise RecipeError("rollout.prompts.path", "required when rollout.prompts.source is jsonl")
        if not Path(prompts.path).is_file():
            raise RecipeError("rollout.prompts.path", f"{prompts.path!r} does not exist")
    elif prompts.path is not None:
        raise RecipeError("rollout.prompts.path", "only used when rollout.prompts.source is jsonl")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


# -------------------------------------------------------------- documentation
def iter_keys(cls: type = Recipe, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, type, default)`` for every leaf key, in schema order (``MISSING``: required)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(where, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(hints[f.name], key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield key, hints[f.name], default


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled in), as recorded in the report."""
    return dataclasses.asdict(recipe)
