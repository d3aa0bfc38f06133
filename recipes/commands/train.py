"""``r3 train RECIPE [--set key=value ...] [--out DIR] [--no-progress]``: GRPO with native, R2 and R3 arms."""

from __future__ import annotations

import argparse
import signal
import sys

from recipes.config import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML with a train section (keys: docs/recipes.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=4 (value in YAML syntax); repeatable")
    p.add_argument("--out", help="output directory (overrides output.dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, args.out)  # every check happens before anything is written
    # SIGTERM unwinds like Ctrl-C, so the scratch output directory is removed and output.dir is untouched.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if recipe.rollout.device == "cpu" and recipe.trainer.device == "cpu":
        import torch

        # A tiny model's matmuls gain nothing from a second intra-op thread, and on a shared 2-core machine
        # spinning OpenMP threads made a step take 33 s instead of 2.3 s (measured, load average ~10).
        torch.set_num_threads(1)
    from recipes.train_loop import run_training

    run_training(recipe, progress=not args.no_progress)
    return 0
