"""``r3 init-model --preset NAME --out DIR [--seed N] [--init preset|unit-scale]``."""

from __future__ import annotations

import argparse

from recipes.config import INIT_MODES
from rollout.engine.config import DTYPES
from rollout.presets import PRESETS, init_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="checkpoint directory to create (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", default="preset", choices=INIT_MODES,
        help="weights: the preset's own random init, or unit-scale, the demo model the recipes use "
             "(model.init: unit-scale; same preset and seed give the same checkpoint, fingerprint included)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="where to draw preset weights (cuda is much faster for bench presets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def run(args: argparse.Namespace) -> int:
    from recipes.progress import library_bars

    if args.seed < 0:
        raise ValueError(f"--seed: must be >= 0, got {args.seed}")
    with library_bars(not args.no_progress):
        if args.init == "unit-scale":
            from recipes.demo_model import make_demo_model

            if args.device != "cpu":
                raise ValueError("--device: --init unit-scale draws its weights on the CPU (that keeps them reproducible)")
            path = make_demo_model(args.preset, args.out, seed=args.seed, dtype=args.dtype)
        else:
            path = init_model(args.preset, args.out, seed=args.seed, dtype=args.dtype, device=args.device)
    print(f"wrote {args.preset} ({args.init} init, seed {args.seed}, {args.dtype}) to {path}")
    return 0
