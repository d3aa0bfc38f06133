"""The recipe schema: what ``r3 run`` reads from YAML, validated before anything runs.

The schema is the dataclasses below; each field's ``doc`` is the one place a
key is described (``docs/recipes.md`` is checked against them by a test). A
recipe is a YAML mapping of the same shape; every key is optional except
``model.name``. A problem is one ``ValueError`` line naming the key, e.g.
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

REPLAY_MODES = ("off", "r2", "r3")
GUARD_MODES = ("off", "warn", "raise")
INIT_MODES = ("preset", "unit-scale")
PROMPT_SOURCES = ("synthetic", "jsonl")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = r"cpu|cuda(:[0-9]+)?"


def _key(doc: str, default: Any = dataclasses.MISSING, *, choices: tuple = (), minimum: float | None = None,
         pattern: str | None = None, factory: Any = None) -> Any:
    """A recipe key: its documentation and its constraints live in one place."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "pattern": pattern}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key("A preset name (see `r3 init-model --help`) or an HF checkpoint directory.")
    seed: int = _key("Seed of a preset's random initialisation.", 0, minimum=0)
    init: str = _key(
        "Presets only. `preset`: the preset's own init (std 0.02; outputs barely depend on routing); "
        "`unit-scale`: std 1/sqrt(fan_in), so outputs depend on routing (see recipes/demo_model.py).",
        "preset", choices=INIT_MODES)
    dir: str = _key("Where preset models are made and cached (relative paths are relative to the working "
                    "directory).", "models")


@dataclass(frozen=True)
class PromptConfig:
    source: str = _key("`synthetic`: prompts drawn from the demo task; `jsonl`: one `{\"input_ids\": [...]}` "
                       "per line of `path`.", "synthetic", choices=PROMPT_SOURCES)
    path: str | None = _key("The JSONL file when `source` is `jsonl`.", None)
    length: int = _key("Synthetic prompt length in tokens.", 16, minimum=1)
    seed: int = _key("Seed of the synthetic prompts.", 0, minimum=0)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = _key("Tokens generated per prompt (fewer if a stop token comes).", 32, minimum=1)
    temperature: float = _key("Sampling temperature; 0 is greedy.", 1.0, minimum=0)
    top_p: float = _key("Nucleus sampling threshold in (0, 1].", 1.0, minimum=0)
    top_k: int = _key("Keep the k most likely tokens; -1 disables.", -1, minimum=-1)
    seed: int | None = _key("Base sampling seed; prompt i uses seed + i. null: unseeded.", 0, minimum=0)
    stop_token_ids: list[int] = _key("Token ids that end a sequence.", factory=list)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = _key("Rollout engine. Only `builtin` (the embedded engine) runs from a recipe so far.", "builtin",
                       choices=("builtin",))
    device: str = _key("Device of the built-in engine: `cpu`, `cuda` or `cuda:N`.", "cpu", pattern=DEVICE_PATTERN)
    dtype: str = _key("Weights and activations dtype of the engine.", "bfloat16", choices=DTYPES)
    overlap: bool = _key("Overlap scheduling: prepare step N+1 on the host while step N runs.", True)
    max_running_requests: int = _key("Most requests decoding at once (continuous batching).", 64, minimum=1)
    max_batch_tokens: int = _key("Most tokens in one forward step (prefill chunks included).", 2048, minimum=1)
    kv_slots: int = _key("KV-cache pool size in tokens; requests are preempted when it runs out.", 16384, minimum=1)
    num_prompts: int = _key("How many prompts to roll out.", 32, minimum=1)
    prompts: PromptConfig = _key("Where prompts come from.", factory=PromptConfig)
    sampling: SamplingConfig = _key("Sampling parameters.", factory=SamplingConfig)


@dataclass(frozen=True)
class TrainerConfig:
    device: str = _key("Device of the trainer forward: `cpu`, `cuda` or `cuda:N`.", "cpu", pattern=DEVICE_PATTERN)
    dtype: str = _key("Trainer dtype (a different dtype from the rollout's is the usual source of "
                      "mismatch).", "float32", choices=DTYPES)
    micro_batch_size: int = _key("Sequences per trainer forward.", 8, minimum=1)
    replay: str = _key("`r3`: replay the rollout's routes; `r2`: replay the trainer's own routes recorded in "
                       "a first forward; `off`: native routing only.", "r3", choices=REPLAY_MODES)
    guard: str = _key("Misalignment guard during replay: `warn`, `raise` or `off`.", "warn", choices=GUARD_MODES)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _key("Run directory, replaced atomically: rollouts.safetensors, report.json, report.md, "
                    "report.png.", "runs/r3")


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = _key("The model rolled out and trained.")
    rollout: RolloutConfig = _key("The rollout engine and what it generates.", factory=RolloutConfig)
    trainer: TrainerConfig = _key("The trainer forward that recomputes logprobs.", factory=TrainerConfig)
    output: OutputConfig = _key("Where results go.", factory=OutputConfig)


# ------------------------------------------------------------------- parsing
def load_recipe(path: str | os.PathLike, overrides: typing.Sequence[str] = (), out: str | None = None) -> Recipe:
    """Read, override (``key=value``, value in YAML syntax) and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    if out is not None:
        raw.setdefault("output", {})
        if not isinstance(raw["output"], dict):
            raise ValueError("output: expected a mapping")
        raw["output"]["dir"] = out
    recipe = parse_recipe(raw)
    check_prompt_source(recipe)
    return recipe


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` sets ``raw["a"]["b"]["c"]``; the value is parsed as YAML (``0.5``, ``true``, ``[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{'.'.join(parts[: depth + 1])}: expected a mapping, cannot set {key}")
    node[parts[-1]] = value


def parse_recipe(raw: Mapping[str, Any]) -> Recipe:
    recipe = _parse(Recipe, raw, "")
    _check_model(recipe.model)
    sampling_params(recipe.rollout.sampling)
    return recipe


def sampling_params(sampling: SamplingConfig) -> Any:
    """The engine's ``SamplingParams`` (without per-prompt seeds); its own checks name the recipe section."""
    from rollout.types import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=sampling.seed, stop_token_ids=tuple(sampling.stop_token_ids),
        )
    except ValueError as exc:
        raise ValueError(f"rollout.sampling: {exc}") from None


def _parse(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where or 'recipe'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ValueError(f"{_join(where, str(key))}: unknown key (known keys here: {known})")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = _value(hints[name], raw[name], key, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{key}: missing (required)")
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
            raise ValueError(f"{key}: expected true or false, got {_show(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {_show(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {_show(value)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {_show(value)}")
    elif typing.get_origin(hint) is list:
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{key}: expected a list of integers, got {_show(value)}")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"{key}: unsupported schema type {hint}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{key}: expected one of {', '.join(meta['choices'])}, got {_show(value)}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise ValueError(f"{key}: expected {meta['pattern']}, got {_show(value)}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ValueError(f"{key}: must be >= {meta['minimum']}, got {_show(value)}")
    return value


def _check_model(model: ModelConfig) -> None:
    from rollout.presets import PRESETS

    if model.name in PRESETS:
        return
    if model.init != "preset":
        raise ValueError(f"model.init: {model.init!r} applies to presets only, {model.name!r} is a checkpoint")
    if not (Path(model.name) / "config.json").is_file():
        raise ValueError(
            f"model.name: {model.name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint directory"
        )


def check_prompt_source(recipe: Recipe) -> None:
    prompts = recipe.rollout.prompts
    if prompts.source == "jsonl":
        if prompts.path is None:
            raise ValueError("rollout.prompts.path: required when rollout.prompts.source is jsonl")
        if not Path(prompts.path).is_file():
            raise ValueError(f"rollout.prompts.path: {prompts.path!r} does not exist")
    elif prompts.path is not None:
        raise ValueError("rollout.prompts.path: only used when rollout.prompts.source is jsonl")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


# -------------------------------------------------------------- documentation
def iter_keys(cls: type = Recipe, where: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """``(dotted key, type, default, doc)`` for every leaf key, in schema order: the docs' table."""
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
        yield key, hints[f.name], default, f.metadata["doc"]


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled in), as recorded in the report."""
    return dataclasses.asdict(recipe)
