"""Real SGLang, offline (``sglang.Engine``, no HTTP), timed the way ``bench.rollout_throughput`` times the built-in engine.

Runs in its own process with ``PYTHONPATH=/tmp/sglang-site`` (SGLang 0.5.17 and the
transformers it pins; see ../shared/tools/sglang-on-gpu/README.md), so it imports
nothing from this project. The engine options are the ones that avoid kernels left
out of that install: triton attention, pytorch sampling, no grammar backend, no
tokenizer (token ids in, token ids out).

Input: ``--prompts FILE``, JSON ``{"<workload>": {"timed": [[ids]...], "warmup": [[ids]...], "new_tokens": N,
"warmup_new_tokens": M}}``.
Output: after each workload, one stdout line ``RESULT [{"workload", "batch", "tokens", "seconds", "tok_s", "note"}...]``
holding every workload so far (the last line is the whole run; a run killed midway still leaves the
workloads it finished); SGLang's own log goes to stderr.
tok/s = generated tokens / wall time of one ``Engine.generate`` call over the whole batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

RESULT_PREFIX = "RESULT "


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of an engine option (argparse type); VALUE is JSON when it parses, else the string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"engine option {text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _check(outputs: list[dict], prompts: list[list[int]], new_tokens: int, routes: bool) -> str:
    """Problems that would make the timing meaningless: short outputs, or routes missing when asked for."""
    problems = []
    short = sum(len(o["output_ids"]) != new_tokens for o in outputs)
    if short:
        problems.append(f"{short} requests stopped before {new_tokens} tokens")
    if routes:
        missing = sum("routed_experts" not in o["meta_info"] for o in outputs)
        if missing:
            problems.append(f"{missing} replies lack routed_experts")
    if len(outputs) != len(prompts):
        problems.append(f"{len(outputs)} replies for {len(prompts)} prompts")
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON file written by bench.rollout_throughput")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routes", choices=["on", "off"], required=True)
    p.add_argument("--overlap", choices=["on", "off"], required=True)
    p.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword (value parsed as JSON when it parses)")
    args = p.parse_args(argv)
    routes = args.routes == "on"
    with open(args.prompts) as f:
        prompts_by_workload = json.load(f)

    import sglang

    engine_kwargs = dict(
        model_path=args.model, skip_tokenizer_init=True, enable_return_routed_experts=routes,
        disable_overlap_schedule=args.overlap == "off", attention_backend="triton", sampling_backend="pytorch",
        grammar_backend="none", random_seed=args.seed, log_level="warning",
    )
    engine_kwargs.update(dict(args.option))
    t0 = time.perf_counter()
    engine = sglang.Engine(**engine_kwargs)
    print(f"sglang {getattr(sglang, '__version__', '?')}: engine up in {time.perf_counter() - t0:.0f}s "
          f"(routes {args.routes}, overlap {args.overlap})", file=sys.stderr, flush=True)
    results = []
    try:
        for workload, prompts in prompts_by_workload.items():
            warm = dict(max_new_tokens=int(prompts["warmup_new_tokens"]), temperature=args.temperature, ignore_eos=True)
            engine.generate(input_ids=prompts["warmup"], sampling_params=warm, return_routed_experts=routes)
            new_tokens = int(prompts["new_tokens"])
            sampling = dict(max_new_tokens=new_tokens, temperature=args.temperature, ignore_eos=True)
            t0 = time.perf_counter()
            outputs = engine.generate(input_ids=prompts["timed"], sampling_params=sampling, return_routed_experts=routes)
            seconds = time.perf_counter() - t0
            tokens = sum(len(o["output_ids"]) for o in outputs)
            results.append(dict(workload=workload, batch=len(prompts["timed"]), tokens=tokens, seconds=seconds,
                                tok_s=tokens / seconds, note=_check(outputs, prompts["timed"], new_tokens, routes)))
            print(f"{workload}: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:,.0f} tok/s",
                  file=sys.stderr, flush=True)
            print(RESULT_PREFIX + json.dumps(results), flush=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
