"""``r3 init-model --preset NAME --out DIR [--seed N]``."""

from __future__ import annotations

import argparse

from rollout.engine.config import DTYPES
from rollout.presets import PRESETS, init_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="checkpoint directory to create (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="where to draw the weights (cuda is much faster for bench presets)")


def run(args: argparse.Namespace) -> int:
    path = init_model(args.preset, args.out, seed=args.seed, dtype=args.dtype, device=args.device)
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}) to {path}")
    return 0
