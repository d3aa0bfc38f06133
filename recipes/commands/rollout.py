"""``r3 rollout --model DIR --prompts FILE.jsonl --out FILE``: rollouts with routes into a rollout file."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from recipes.config import DEVICE_PATTERN, DTYPES, SamplingConfig, check_prompt_source, parse_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory")
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
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from recipes.pipeline import generate, read_prompts_jsonl
    from rollout.rollout_file import model_fingerprint, save_rollouts

    # The recipe schema validates the same options the same way as `r3 run` does.
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
    prompts = read_prompts_jsonl(args.prompts)
    fingerprint = model_fingerprint(args.model)
    start = time.perf_counter()
    rollouts, seconds = generate(Path(args.model), recipe, prompts, progress=not args.no_progress)
    save_rollouts(args.out, rollouts, model_fingerprint=fingerprint,
                  meta={"command": "r3 rollout", "sampling": dataclasses.asdict(recipe.rollout.sampling)})
    generated = sum(len(r.output_ids) for r in rollouts)
    print(f"wrote {len(rollouts)} rollouts ({generated} generated tokens, {generated / seconds:.1f} tok/s) "
          f"to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
