"""One module per ``r3`` subcommand; each defines ``add_arguments(parser)`` and ``run(args) -> int``.

``r3 run`` and ``r3 train`` both take a recipe, so their shared flags and loading live here.
"""

from __future__ import annotations

import argparse
import signal
import sys

from recipes.config import Recipe, load_recipe


def add_recipe_arguments(p: argparse.ArgumentParser, set_example: str) -> None:
    """RECIPE, ``--set``, ``--out`` and ``--no-progress``, as every recipe-driven command takes them."""
    p.add_argument("recipe", help="recipe YAML (keys: docs/recipes.md), or a packaged recipe's name, e.g. tiny-moe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe key, e.g. --set {set_example} (value in YAML syntax); repeatable")
    p.add_argument("--out", help="output directory (overrides output.dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def load_recipe_to_run(args: argparse.Namespace) -> Recipe:
    """The validated recipe (every check happens before anything is written), with SIGTERM unwinding
    like Ctrl-C, so the scratch output directory is removed and output.dir is untouched."""
    recipe = load_recipe(args.recipe, args.overrides, args.out)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return recipe
