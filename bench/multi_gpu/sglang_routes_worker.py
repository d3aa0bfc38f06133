"""One SGLang configuration (say ``tp_size=2 ep_size=2``), offline: greedy decode with routes, then teacher-forced routes.

Runs in its own process with ``PYTHONPATH=/tmp/sglang-site`` (imports nothing from this
project), like ``bench/sglang_offline.py``, with the engine options that avoid the kernels
the wheelhouse leaves out.

Input ``--job FILE``: JSON ``{"prompts": [[ids]...], "forced": [[ids]...] or null, "new_tokens": N}``;
``forced: null`` forces this engine's own greedy outputs (``prompt + output``), the baseline's choice.
Output ``--out FILE``: JSON ``{"decode": [{"output_ids", "routed_experts", "seconds"}...],
"forced": [{"routed_experts"}...], "engine_seconds"}``; ``routed_experts`` is SGLang's base64 as is.
``forced`` sequences are prefilled with one new token, so their routes cover every position
of the given tokens: the same tokens for every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_offline import parse_option  # noqa: E402  (bench/sglang_offline.py: KEY=VALUE engine options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)

    import sglang

    kwargs = dict(
        model_path=args.model, skip_tokenizer_init=True, enable_return_routed_experts=True,
        attention_backend="triton", sampling_backend="pytorch", grammar_backend="none", log_level="warning",
    )  # fmt: skip
    kwargs.update(dict(args.option))
    t0 = time.perf_counter()
    engine = sglang.Engine(**kwargs)
    engine_seconds = time.perf_counter() - t0
    try:
        greedy = dict(max_new_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        decoded = engine.generate(input_ids=job["prompts"], sampling_params=greedy, return_routed_experts=True)
        seconds = time.perf_counter() - t0
        sequences = job["forced"] or [p + o["output_ids"] for p, o in zip(job["prompts"], decoded)]
        one = dict(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        forced = engine.generate(input_ids=sequences, sampling_params=one, return_routed_experts=True)
    finally:
        engine.shutdown()
    result = {
        "engine_seconds": engine_seconds,
        "decode_seconds": seconds,
        "decode": [{"output_ids": o["output_ids"], "routed_experts": o["meta_info"].get("routed_experts")} for o in decoded],
        "forced": [{"input_ids": q, "routed_experts": o["meta_info"].get("routed_experts")} for q, o in zip(sequences, forced)],
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
