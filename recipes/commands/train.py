"""``r3 train RECIPE [--set key=value ...] [--out DIR] [--no-progress]``: GRPO with native, R2 and R3 arms."""

from __future__ import annotations

import argparse

from recipes.commands import add_recipe_arguments, load_recipe_to_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, set_example="train.steps=4")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe_to_run(args)
    if recipe.rollout.device == "cpu" and recipe.trainer.device == "cpu":
        import torch

        # A tiny model's matmuls gain nothing from a second intra-op thread, and on a shared 2-core machine
        # spinning OpenMP threads made a step take 33 s instead of 2.3 s (measured, load average ~10).
        torch.set_num_threads(1)
    from recipes.train_loop import run_training

    run_training(recipe, progress=not args.no_progress)
    return 0
