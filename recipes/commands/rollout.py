"""``r3 rollout --model DIR --prompts FILE.jsonl --out FILE``: rollouts with routes into a rollout file."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from recipes.config import DEVICE_PATTERN, DTYPES, RecipeError, SamplingConfig, check_prompt_source, parse_recipe

# The recipe key each flag fills, so an error names what the user typed.
FLAG_OF_KEY = {
    "model.name": "--model",
    "rollout.prompts.path": "--prompts",
    "rollout.device": "--device",
    "rollout.dtype": "--dtype",
    "rollout.sampling.max_new_tokens": "--max-new-tokens",
    "rollout.sampling.temperature": "--temperature",
    "rollout.sampling.top_p": "--top-p",
    "rollout.sampling.top_k": "--top-k",
    "rollout.sampling.seed": "--seed",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (see r3 init-model)")
    p.add_argument("--prompts", required=True, help='JSONL file, one {"input_ids": [...]} per line')
    p.add_argument("--out", required=True, help="rollout file to write (safetensors, replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    p.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    p.add_argument("--top-k", type=int, default=SamplingConfig.top_k)
    p.add_argument("--seed", type=int, default=SamplingConfig.seed, help="prompt i uses seed + i")
    p.add_argument("--device", default="cpu", help=DEVICE_PATTERN)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--no-overlap", action="store_true", help="plain scheduling loop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from recipes.pipeline import generate, read_prompts_jsonl
    from rollout.moe_spec import read_config
    from rollout.rollout_file import model_fingerprint, save_rollouts

    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(
            f"--model: {args.model!r} is not a checkpoint directory (no config.json); "
            "make one with: r3 init-model --preset tiny-qwen3-moe --out DIR"
        )
    try:  # the recipe schema checks the same options the same way as `r3 run` does
        recipe = parse_recipe({
            "model": {"name": args.model},
            "rollout": {
                "device": args.device, "dtype": args.dtype, "overlap": not args.no_overlap,
                "prompts": {"source": "jsonl", "path": args.prompts},
                "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                             "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed},
            },
        })
        check_prompt_source(recipe)
    except RecipeError as exc:
        raise ValueError(f"{FLAG_OF_KEY.get(exc.key, exc.key)}: {exc.problem}") from None
    # every prompt is checked against the model's vocabulary and context before the engine loads
    prompts = read_prompts_jsonl(args.prompts, model_config=read_config(args.model))
    fingerprint = model_fingerprint(args.model)
    start = time.perf_counter()
    rollouts, seconds = generate(Path(args.model), recipe, prompts, progress=not args.no_progress)
    save_rollouts(args.out, rollouts, model_fingerprint=fingerprint,
                  meta={"command": "r3 rollout", "sampling": dataclasses.asdict(recipe.rollout.sampling)})
    generated = sum(len(r.output_ids) for r in rollouts)
    print(f"wrote {len(rollouts)} rollouts ({generated} generated tokens) to {args.out} in "
          f"{time.perf_counter() - start:.1f}s; generation {generated / seconds:.1f} tok/s "
          f"({seconds:.1f}s, engine load not included)")
    return 0
