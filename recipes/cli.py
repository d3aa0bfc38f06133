"""The ``r3`` command line. Each subcommand lives in ``recipes/commands/<name>.py`` and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "init-model": ("recipes.commands.init_model", "write a random-weight HF checkpoint from a preset"),
    "rollout": ("recipes.commands.rollout", "generate rollouts with routed experts into a rollout file"),
    "run": ("recipes.commands.run", "run a recipe: rollout, trainer replay, consistency report"),
    "train": ("recipes.commands.train", "GRPO on a verifiable token task: native, R2 and R3 arms over training steps"),
    "inspect": ("recipes.commands.inspect", "summarise a rollout file"),
    "serve": ("recipes.commands.serve", "serve the built-in engine over SGLang's /generate protocol"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="r3", description="Rollout Routing Replay for MoE RL")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / the error for an unknown command
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"r3 {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"r3 {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
