"""``r3 run RECIPE [--set key=value ...] [--out DIR] [--no-progress]``: the main job."""

from __future__ import annotations

import argparse
import signal
import sys

from recipes.config import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (keys: docs/recipes.md), or a packaged recipe's name, e.g. tiny-moe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set rollout.num_prompts=8 (value in YAML syntax); repeatable")
    p.add_argument("--out", help="output directory (overrides output.dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, args.out)  # every check happens before anything is written
    # SIGTERM unwinds like Ctrl-C, so the scratch output directory is removed and output.dir is untouched.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from recipes.pipeline import run_recipe

    run_recipe(recipe, progress=not args.no_progress)
    return 0
