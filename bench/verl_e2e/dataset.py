"""A synthetic arithmetic dataset in verl's RL parquet format, written locally.

Each row is what verl's ``RLHFDataset`` and reward loop read (the layout of verl's
``examples/data_preprocess/gsm8k.py``): ``prompt`` as chat messages, ``data_source``,
``ability``, ``reward_model.ground_truth`` (and ``style``), ``extra_info.index``.

Usage: ``python3 bench/verl_e2e/dataset.py --out DIR [--train N] [--val N] [--seed S]``
writes ``DIR/train.parquet`` and ``DIR/val.parquet``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.verl_e2e.reward import DATA_SOURCE  # noqa: E402  (the reward checks that its rows come from here)


def rows(count: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    out = []
    for index in range(count):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        out.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number."}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return out


def write(out: str | os.PathLike, train: int = 64, val: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write both splits atomically (each file appears whole or not at all)."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, count in (("train", train), ("val", val)):
        if count < 1:
            raise ValueError(f"{split} needs at least one row, got {count}")
        path = out / f"{split}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pd.DataFrame(rows(count, seed, split)).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, val = write(args.out, args.train, args.val, args.seed)
    print(f"wrote {train} ({args.train} rows) and {val} ({args.val} rows)")


if __name__ == "__main__":
    main()
