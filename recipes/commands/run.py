"""``r3 run RECIPE [--set key=value ...] [--out DIR] [--no-progress]``: the main job."""

from __future__ import annotations

import argparse

from recipes.commands import add_recipe_arguments, load_recipe_to_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, set_example="rollout.num_prompts=8")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe_to_run(args)
    from recipes.pipeline import run_recipe

    run_recipe(recipe, progress=not args.no_progress)
    return 0
