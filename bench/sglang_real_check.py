"""Check the SGLang backend against a live ``/generate`` server and print a JSON summary.

Check mode (default), given ``--url`` of a server started with
``--enable-return-routed-experts`` on the checkpoint ``--model`` (without
``--url``: an in-process ``sglang.Engine`` on ``--model``, options from ``--sglang-arg``):

* greedy and sampled requests: every reply must decode into routes of the
  right shape (``seq_len - 1`` rows, only MoE layers);
* multi-turn: a continuation with ``routed_experts_start_len`` must return
  exactly the rows a single-shot request of the same prompt returns past
  ``start_len``, and the concatenated turns are compared with that single shot;
* prefix cache: a prompt extending an earlier sequence must give the same rows
  for the shared prefix;
* the built-in engine on the same weights: greedy token agreement, and route
  agreement teacher-forced on the server's own tokens (same top-k *set* per row).

``--http-bench``: ``--requests`` requests at ``--concurrency``, routes on and
off, reporting output tokens per second.

Runs against real SGLang on a GPU machine, and against ``r3 serve`` here.
Exit status is 1 when a hard check (decoding, start_len rows, prefix rows) fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from rollout.atomic import atomic_write_text
from rollout.moe_spec import MoESpec, read_config
from rollout.routed_experts import RoutedExperts
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.http_client import HTTPClient
from rollout.sglang.multiturn import continuation_request, merge_turn
from rollout.types import Rollout, SamplingParams


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = http_bench(args) if args.http_bench else check(args)
    except ValueError as exc:  # bad options, an unreachable shape, a reply that does not decode
        print(f"sglang_real_check: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0 if summary.get("ok", True) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="http://host:port of the SGLang (or r3 serve) server")
    p.add_argument(
        "--sglang-arg", action="append", default=[], metavar="KEY=VALUE",
        help="in-process sglang.Engine option, e.g. attention_backend=triton (VALUE parsed as JSON when it can be)",
    )
    p.add_argument("--model", required=True, help="the server's checkpoint directory (config + weights)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompts", type=int, default=4, help="prompts per check")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device for the built-in engine comparison")
    p.add_argument("--dtype", default="float32", help="dtype for the built-in engine comparison")
    p.add_argument("--no-builtin", action="store_true", help="skip the comparison with the built-in engine")
    p.add_argument("--http-bench", action="store_true", help="throughput mode instead of the checks")
    p.add_argument("--requests", type=int, default=64, help="--http-bench: number of requests")
    p.add_argument("--concurrency", type=int, default=16, help="--http-bench: requests in flight")
    p.add_argument("--prompt-len", type=int, default=128, help="--http-bench: prompt tokens")
    p.add_argument("--rounds", type=int, default=3, help="--http-bench: alternating on/off rounds (median reported)")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    return p


def _backend(args: argparse.Namespace, **kwargs: Any) -> SGLangBackend:
    if args.url is not None:
        if args.sglang_arg:
            raise ValueError("--sglang-arg only applies to the in-process engine (no --url)")
        return SGLangBackend(url=args.url, model_path=args.model, api_key=args.api_key, **kwargs)
    options = {}
    for item in args.sglang_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sglang-arg must be KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return SGLangBackend(model_path=args.model, **kwargs, **options)


def _server_version(args: argparse.Namespace) -> str | None:
    """SGLang reports its version on ``/get_server_info``; r3 serve has no such endpoint."""
    if args.url is None:
        return None
    try:
        info = HTTPClient(args.url, api_key=args.api_key, max_retries=0).get_json("/get_server_info")
    except (ValueError, RuntimeError, OSError):
        return None
    return info.get("version") if isinstance(info, dict) else None


def _random_prompts(n: int, vocab: int, rng: np.random.Generator, low: int = 8, high: int = 64) -> list[list[int]]:
    return [rng.integers(0, vocab, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def _rows_equal(a: RoutedExperts, b: RoutedExperts) -> float | None:
    """Fraction of (token, layer) rows with the same expert *set* (order within top-k is not meaningful).

    None when the two cover different positions (e.g. the sequences ended at different lengths).
    """
    if (a.start, a.ids.shape) != (b.start, b.ids.shape):
        return None
    if a.num_tokens == 0:
        return 1.0
    return float((np.sort(a.ids, -1) == np.sort(b.ids, -1)).all(-1).mean())


def _shape_ok(r: Rollout, spec: MoESpec) -> bool:
    routes = r.routed_experts
    return (
        routes is not None
        and routes.end == r.num_tokens - 1
        and routes.moe_layers == spec.moe_layers
        and routes.top_k == spec.top_k
        and bool(routes.row_mask().all())
    )


def check(args: argparse.Namespace) -> dict[str, Any]:
    spec = MoESpec.from_pretrained(args.model)
    vocab = int(read_config(args.model)["vocab_size"])
    rng = np.random.default_rng(args.seed)
    prompts = _random_prompts(args.prompts, vocab, rng)
    greedy = SamplingParams(args.max_new_tokens, temperature=0)
    summary: dict[str, Any] = {
        "url": args.url or "in-process sglang.Engine",
        "server_version": _server_version(args),
        "model": str(args.model),
        "spec": spec.__dict__ | {"moe_layers": list(spec.moe_layers)},
    }
    with _backend(args) as backend:
        t0 = time.perf_counter()
        greedy_out = backend.generate(prompts, greedy)
        sampled = [
            backend.generate([p], SamplingParams(args.max_new_tokens, temperature=1.0, seed=args.seed + i))[0]
            for i, p in enumerate(prompts)
        ]
        summary["greedy"] = {"n": len(greedy_out), "routes_ok": all(_shape_ok(r, spec) for r in greedy_out)}
        summary["sampled"] = {"n": len(sampled), "routes_ok": all(_shape_ok(r, spec) for r in sampled)}

        # Multi-turn: turn 2 fetched with start_len vs the same prompt fetched whole.
        first = greedy_out[0]
        injected = rng.integers(0, vocab, size=3).tolist()
        prompt2, start = continuation_request(first, injected)
        turn = backend.generate([prompt2], greedy, start_len=start)[0]
        whole = backend.generate([prompt2], greedy)[0]
        merged = merge_turn(first, injected, turn)
        summary["multi_turn"] = {
            "start_len": start,
            "turn_rows": turn.routed_experts.num_tokens,
            "rows_expected": len(prompt2) + len(turn.output_ids) - 1 - start,
            "turn_equals_whole_tail": turn.routed_experts == whole.routed_experts.slice(start),
            "turn_vs_whole_tail_row_agreement": _rows_equal(turn.routed_experts, whole.routed_experts.slice(start)),
            "same_tokens_as_whole": turn.output_ids == whole.output_ids,
            "concat_vs_whole_row_agreement": _rows_equal(merged.routed_experts, whole.routed_experts),
            "concat_equals_whole": merged.routed_experts == whole.routed_experts,
        }

        # Prefix cache: first's sequence plus a few tokens; the shared rows must not change.
        extended = first.token_ids + rng.integers(0, vocab, size=3).tolist()
        cached = backend.generate([extended], SamplingParams(4, temperature=0))[0]
        summary["prefix_cache"] = {
            "cached_tokens": cached.meta.get("sglang", {}).get("cached_tokens"),
            "prefix_rows_equal": cached.routed_experts.slice(0, first.routed_experts.end) == first.routed_experts,
        }
        summary["server_seconds"] = round(time.perf_counter() - t0, 3)

    if not args.no_builtin:
        summary["builtin_comparison"] = _compare_with_builtin(args, prompts, greedy_out)

    mt = summary["multi_turn"]
    summary["ok"] = bool(
        summary["greedy"]["routes_ok"] and summary["sampled"]["routes_ok"]
        and mt["turn_rows"] == mt["rows_expected"] and mt["turn_equals_whole_tail"]
        and summary["prefix_cache"]["prefix_rows_equal"]
    )
    return summary


def _compare_with_builtin(args: argparse.Namespace, prompts: list[list[int]], served: list[Rollout]) -> dict[str, Any]:
    from rollout import RolloutWorker

    with RolloutWorker(args.model, engine="builtin", device=args.device, dtype=args.dtype) as worker:
        mine = worker.generate(prompts, SamplingParams(args.max_new_tokens, temperature=0))
        # Teacher-forced: the built-in engine's routes for the server's exact sequences.
        forced = worker.generate([r.token_ids for r in served], SamplingParams(1, temperature=0))
    same_seq = [a.output_ids == b.output_ids for a, b in zip(mine, served)]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y), len(a.output_ids))
        for a, b in zip(mine, served)
    ]
    agreement = [
        _rows_equal(f.routed_experts.slice(s.routed_experts.start, s.routed_experts.end), s.routed_experts)
        for f, s in zip(forced, served)
    ]
    lp = [
        float(np.mean(np.abs(np.array(a.output_logprobs) - np.array(b.output_logprobs))))
        for a, b, same in zip(mine, served, same_seq) if same
    ]
    return {
        "greedy_sequences_identical": f"{sum(same_seq)}/{len(same_seq)}",
        "greedy_tokens_before_first_difference": first_diff,
        "route_row_agreement_teacher_forced": round(float(np.mean(agreement)), 5),
        "mean_abs_logprob_diff_identical_sequences": round(float(np.mean(lp)), 6) if lp else None,
    }


def http_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Routes requested vs not, alternating for ``--rounds`` rounds so drift hits both; medians reported."""
    vocab = int(read_config(args.model)["vocab_size"])
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, vocab, size=args.prompt_len).tolist() for _ in range(args.requests)]
    sampling = SamplingParams(args.max_new_tokens, temperature=1.0)
    rates: dict[str, list[float]] = {"routes_on": [], "routes_off": []}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for mode in rates:
            with _backend(args, return_routed_experts=mode == "routes_on", concurrency=args.concurrency) as backend:
                backend.generate(prompts[: args.concurrency], sampling)  # warm-up: connections, compilation
                t0 = time.perf_counter()
                out = backend.generate(prompts, sampling)
                wall = time.perf_counter() - t0
            tokens[mode] = sum(len(r.output_ids) for r in out)
            rates[mode].append(round(tokens[mode] / wall, 1))
    results: dict[str, Any] = {
        "requests": args.requests, "concurrency": args.concurrency, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
    }
    for mode, per_round in rates.items():
        results[mode] = {
            "output_tokens": tokens[mode],
            "output_tok_per_s": float(np.median(per_round)),
            "per_round_tok_per_s": per_round,
        }
    results["routes_overhead"] = round(
        results["routes_off"]["output_tok_per_s"] / results["routes_on"]["output_tok_per_s"] - 1, 4
    )
    return results


if __name__ == "__main__":
    sys.exit(main())
