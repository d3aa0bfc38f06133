"""Detection and false-alarm rates of the per-sequence misalignment guard, on CPU.

Rollouts come from the built-in engine in bf16 (``rollout.engine.engine.Engine`` through
``RolloutWorker``) on the unit-scale demo model (``recipes/demo_model.py``, routing that depends
on the tokens); the trainer is the same weights in fp32. Each trial draws a batch of 8 rollouts,
pads it the verl way, and replays it three ways at the default threshold:

* correct routes: a flag is a false alarm;
* one sequence's routes shifted by one token inside its row (either direction): detected only if
  the guard names that sequence;
* two sequences' routes swapped: detected only if the guard names both.

``python -m bench.guard_detection [--trials 50] [--out DIR]``; JSON goes to ``$OUT`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from recipes.demo_model import make_demo_model, synthetic_prompts
from rollout import RolloutWorker, SamplingParams
from rollout.moe_spec import MoESpec
from trainer_bridge import RouteMisalignmentWarning, pad_batch, replay

BATCH = 8


def flagged_rows(model, inputs, routes) -> set[int]:
    """Rows the guard names in its warning (empty when it passes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RouteMisalignmentWarning)
        with replay(model, routes, guard="warn"), torch.no_grad():
            model(**inputs)
    rows: set[int] = set()
    for w in caught:
        if issubclass(w.category, RouteMisalignmentWarning):
            rows |= {int(r) for r in re.findall(r"\(row (\d+), tokens", str(w.message))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--pool", type=int, default=64, help="rollouts generated once; batches are drawn from them")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--preset", default="tiny-qwen3-moe")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_demo_model(args.preset, Path(tmp) / "model", seed=0, dtype="bfloat16")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        prompts = synthetic_prompts(args.pool, args.prompt_len, vocab, seed=0)
        with RolloutWorker(path, dtype="bfloat16") as worker:
            pool = worker.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0))
    spec = MoESpec.from_config(model.config)
    rng = random.Random(0)
    counts = {"false_alarm": 0, "shift_detected": 0, "swap_detected": 0, "shift_named_others": 0}
    for _ in range(args.trials):
        batch = pad_batch(rng.sample(pool, BATCH), spec)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        counts["false_alarm"] += bool(flagged_rows(model, inputs, batch.routes))
        row, shift = rng.randrange(BATCH), rng.choice((1, -1))
        shifted = batch.routes.clone()
        cols = batch.attention_mask[row].bool().nonzero().flatten()
        shifted[row, cols] = batch.routes[row, cols].roll(shift, dims=0)
        named = flagged_rows(model, inputs, shifted)
        counts["shift_detected"] += row in named
        counts["shift_named_others"] += bool(named - {row})
        a, b = rng.sample(range(BATCH), 2)
        swapped = batch.routes.clone()
        swapped[[a, b]] = batch.routes[[b, a]]
        counts["swap_detected"] += {a, b} <= flagged_rows(model, inputs, swapped)
    result = {
        "bench": "guard_detection",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "model": f"{args.preset} unit-scale demo, bf16 engine rollouts, fp32 trainer",
        "batch": BATCH,
        "trials": args.trials,
        "tokens_per_sequence": args.prompt_len + args.new_tokens,
        "false_alarm_rate": counts["false_alarm"] / args.trials,
        "shift_detection_rate": counts["shift_detected"] / args.trials,
        "shift_other_rows_named_rate": counts["shift_named_others"] / args.trials,
        "swap_detection_rate": counts["swap_detected"] / args.trials,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "guard_detection.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"{'case':<34} {'rate':>6}")
    for key in ("false_alarm_rate", "shift_detection_rate", "shift_other_rows_named_rate", "swap_detection_rate"):
        print(f"{key:<34} {result[key]:>6.3f}")


if __name__ == "__main__":
    main()
