"""Detection and false-alarm rates of the per-sequence misalignment guard, on CPU.

Rollouts come from the built-in engine in bf16 (``rollout.engine.engine.Engine`` through
``RolloutWorker``) on the unit-scale demo model (``recipes/demo_model.py``, routing that depends
on the tokens); the trainer is the same weights in fp32. Each trial draws a batch of 8 rollouts,
pads it the verl way, and replays it three ways at the default threshold:

* correct routes: a flag is a false alarm;
* one sequence's routes shifted by one token inside its row (either direction): detected only if
  the guard names that sequence;
* one sequence's later half shifted by one token (a later turn off by one): the same;
* two sequences' routes swapped: detected only if the guard names both.

It also reports the distribution of the two per-sequence statistics the guard judges: the aligned
overlap (against the threshold) and the gain one token off (against ``SHIFT_MARGIN``), and the
margins of the closest sequences on either side.

``python -m bench.guard_detection [--trials 200] [--pool 512] [--out DIR]``; JSON goes to ``$OUT`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from trainer_bridge.guard import SHIFT_MARGIN, SequenceAgreement, chance_overlap, default_threshold

BATCH = 8


def judge(model, inputs, routes) -> tuple[dict[int, SequenceAgreement], set[int], bool]:
    """Each row's sequence, the rows the guard flags, and whether it warned at all (a sequence or a layer)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RouteMisalignmentWarning)
        with replay(model, routes, guard="warn") as session, torch.no_grad():
            model(**inputs)
            seqs = {s.row: s for s in session.sequence_agreement}
            flagged = {s.row for s in session.guard.flagged()}
    return seqs, flagged, any(issubclass(w.category, RouteMisalignmentWarning) for w in caught)


def shift_row(routes: torch.Tensor, mask: torch.Tensor, row: int, shift: int, from_half: bool) -> torch.Tensor:
    """``row``'s routes moved by ``shift`` tokens inside its real tokens (all of them, or the later half)."""
    out = routes.clone()
    cols = mask[row].bool().nonzero().flatten()
    cols = cols[len(cols) // 2 :] if from_half else cols
    out[row, cols] = routes[row, cols].roll(shift, dims=0)
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    qs = {"min": 0.0, "p01": 0.01, "p50": 0.5, "p99": 0.99, "max": 1.0}
    return {k: round(float(t.quantile(q)), 4) for k, q in qs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--pool", type=int, default=512, help="rollouts generated once; batches are drawn from them")
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
    threshold = default_threshold(spec.top_k, spec.num_experts)
    rng = random.Random(0)
    cases = ("correct", "shifted", "later_half_shifted", "swapped")
    counts = {"false_alarm": 0, "shifted": 0, "later_half_shifted": 0, "swapped": 0, "shift_named_others": 0}
    # per case, the judged sequences: every sequence of the correct batches, the shifted ones, the two swapped ones
    seen: dict[str, list[SequenceAgreement]] = {case: [] for case in cases}
    for _ in range(args.trials):
        batch = pad_batch(rng.sample(pool, BATCH), spec)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        seqs, _, warned = judge(model, inputs, batch.routes)
        counts["false_alarm"] += warned
        seen["correct"] += seqs.values()
        for case, from_half in (("shifted", False), ("later_half_shifted", True)):
            row = rng.randrange(BATCH)
            seqs, named, _ = judge(model, inputs, shift_row(batch.routes, batch.attention_mask, row, rng.choice((1, -1)), from_half))
            counts[case] += row in named
            counts["shift_named_others"] += bool(named - {row})
            seen[case].append(seqs[row])
        a, b = rng.sample(range(BATCH), 2)
        swapped = batch.routes.clone()
        swapped[[a, b]] = batch.routes[[b, a]]
        seqs, named, _ = judge(model, inputs, swapped)
        counts["swapped"] += {a, b} <= named
        seen["swapped"] += [seqs[a], seqs[b]]
    # the acceptance cases: a whole sequence shifted, two swapped (a later half shifted is reported, not required)
    misaligned = seen["shifted"] + seen["swapped"]
    result = {
        "bench": "guard_detection",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "model": f"{args.preset} unit-scale demo, bf16 engine rollouts, fp32 trainer",
        "batch": BATCH,
        "trials": args.trials,
        "pool": args.pool,
        "tokens_per_sequence": args.prompt_len + args.new_tokens,
        "threshold": round(threshold, 4),
        "shift_margin": SHIFT_MARGIN,
        "chance": round(chance_overlap(spec.top_k, spec.num_experts), 4),
        "false_alarm_rate": counts["false_alarm"] / args.trials,
        "shift_detection_rate": counts["shifted"] / args.trials,
        "later_half_shift_detection_rate": counts["later_half_shifted"] / args.trials,
        "shift_other_rows_named_rate": counts["shift_named_others"] / (2 * args.trials),
        "swap_detection_rate": counts["swapped"] / args.trials,
        "overlap": {case: _quantiles([s.overlap for s in v]) for case, v in seen.items()},
        "shift_gain": {case: _quantiles([s.shift_gain for s in v if s.shift_gain is not None]) for case, v in seen.items()},
        # distance to the rule of the closest correct sequence (it must pass both tests) ...
        "margin_correct_overlap": round(min(s.overlap for s in seen["correct"]) - threshold, 4),
        "margin_correct_shift_gain": round(SHIFT_MARGIN - max(s.shift_gain for s in seen["correct"]), 4),
        # ... and of the closest shifted or swapped one (it must fail either)
        "margin_misaligned": round(min(max(threshold - s.overlap, (s.shift_gain or -1) - SHIFT_MARGIN) for s in misaligned), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "guard_detection.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"{'case':<34} {'rate':>6}")
    rates = ("false_alarm_rate", "shift_detection_rate", "later_half_shift_detection_rate",
             "shift_other_rows_named_rate", "swap_detection_rate")
    for key in rates:
        print(f"{key:<34} {result[key]:>6.3f}")
    for stat, rule in (("overlap", f"threshold {result['threshold']}"), ("shift_gain", f"margin {SHIFT_MARGIN}")):
        print(f"per-sequence {stat} ({rule}):")
        print(f"{'sequences':<20}" + "".join(f"{q:>8}" for q in ("min", "p01", "p50", "p99", "max")))
        for case, q in result[stat].items():
            print(f"{case:<20}" + "".join(f"{v:>8.3f}" for v in q.values()))
    print(f"margins: correct overlap {result['margin_correct_overlap']}, correct shift gain "
          f"{result['margin_correct_shift_gain']}, misaligned {result['margin_misaligned']}")

if __name__ == "__main__":
    main()
