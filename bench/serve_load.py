"""Hundreds of concurrent clients against ``r3 serve`` on 127.0.0.1, each on a fresh connection.

The mix: plain ``/generate`` requests (SGLang's int32 routes and the compact ``r3``
routes), SSE streams, clients that hang up mid-stream, and clients that send bad
bodies. Every client starts at the same moment (a barrier), so the listen backlog
and the connection limit see the whole burst. ``run_load`` returns one ``Outcome``
per client; ``tests/rollout/serve/test_serve_load.py`` checks every good reply's
routes against a transformers forward, and this script's ``main`` reports the figures:

    python bench/serve_load.py --model DIR [--clients 512] [--out DIR]

It starts the built-in engine and the server in this process, runs the load, and
writes ``serve_load.json`` under ``--out`` (default ``$OUT`` or ``.``), then prints a
summary table last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("plain", "compact", "stream", "hangup", "bad")
# (body, what the 400 message must contain): bodies the issue found fatal, and ordinary mistakes.
BAD_BODIES = [
    (b"[" * 50_000 + b"]" * 50_000, "recursion limit"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": null}}', "max_new_tokens is required"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": 1' + b"0" * 400 + b"}}",
     "temperature"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "sampling_seed": 9223372036854775808}}',
     "seed"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "top_k": 9223372036854775808}}', "top_k"),
    (b'{"input_ids": "hello", "sampling_params": {"max_new_tokens": 2}}', "input_ids"),
    (b'{"input_ids": [1, 2.5], "sampling_params": {"max_new_tokens": 2}}', "input_ids[1]"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "lora_path": "x"}', "lora_path"),
    (b"{not json", "not valid JSON"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "stream": "yes"}', "stream"),
]


@dataclass
class Job:
    kind: str
    prompt: list[int]
    sampling: dict[str, Any]
    bad_body: bytes = b""
    bad_message: str = ""


@dataclass
class Outcome:
    job: Job
    status: int | None = None
    reply: Any = None  # the JSON reply (the last SSE chunk for streams)
    chunks: int = 0
    error: str | None = None  # a transport failure: reset, refused, timeout
    latency_s: float = 0.0
    extra: dict = field(default_factory=dict)


def make_jobs(n: int, vocab_size: int, seed: int = 0) -> list[Job]:
    """``n`` clients: a fixed share of each kind, short prompts and few new tokens (CPU-sized)."""
    rng = np.random.default_rng(seed)
    shares = {"plain": 0.35, "compact": 0.2, "stream": 0.25, "hangup": 0.08}
    jobs = []
    for i in range(n):
        u = (i + 0.5) / n
        kind, edge = "bad", 0.0
        for name, share in shares.items():
            edge += share
            if u < edge:
                kind = name
                break
        prompt = rng.integers(0, vocab_size, int(rng.integers(3, 9))).tolist()
        new = 600 if kind == "hangup" else int(rng.integers(2, 5))
        sampling: dict[str, Any] = {"max_new_tokens": new, "temperature": 0}
        if i % 3 == 0:
            sampling.update(temperature=1.0, top_k=20, sampling_seed=int(i))
        job = Job(kind, prompt, sampling)
        if kind == "bad":
            job.bad_body, job.bad_message = BAD_BODIES[i % len(BAD_BODIES)]
        jobs.append(job)
    rng.shuffle(jobs)
    return jobs


def body_of(job: Job) -> bytes:
    if job.kind == "bad":
        return job.bad_body
    body: dict[str, Any] = {"input_ids": job.prompt, "sampling_params": job.sampling, "return_logprob": True,
                            "return_routed_experts": job.kind != "hangup"}
    if job.kind == "compact":
        body["routed_experts_format"] = "r3"
    if job.kind in ("stream", "hangup"):
        body["stream"] = True
    return json.dumps(body).encode()


def _one(host: str, port: int, job: Job, barrier: threading.Barrier, timeout: float) -> Outcome:
    out = Outcome(job)
    barrier.wait()
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/generate", body_of(job), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out.status = resp.status
        if job.kind == "hangup":
            first = resp.read1(65536)
            out.extra["first_chunk"] = first[:6]
            conn.sock.shutdown(2)  # hang up mid-stream
        elif resp.getheader("Content-Type", "").startswith("text/event-stream"):
            events = [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e]
            out.chunks = len(events) - 1
            out.extra["done"] = events[-1] == "[DONE]"
            out.extra["partials"] = [json.loads(e) for e in events[:-2]]
            out.reply = json.loads(events[-2])
        else:
            out.reply = json.loads(resp.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.error = repr(exc)
    finally:
        conn.close()
        out.latency_s = time.perf_counter() - started
    return out


def run_load(host: str, port: int, jobs: list[Job], timeout: float = 120.0) -> tuple[list[Outcome], float]:
    """Every job in its own thread and connection, all released at once; (outcomes in job order, wall seconds)."""
    barrier = threading.Barrier(len(jobs) + 1)
    outcomes: list[Outcome | None] = [None] * len(jobs)

    def work(i: int) -> None:
        outcomes[i] = _one(host, port, jobs[i], barrier, timeout)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(timeout + 30)
    wall = time.perf_counter() - started
    return [o if o is not None else Outcome(jobs[i], error="client thread did not finish") for i, o in enumerate(outcomes)], wall


def summarize(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.job.kind == kind]
        if not mine:
            continue
        lat = sorted(o.latency_s for o in mine)
        statuses: dict[str, int] = {}
        for o in mine:
            key = str(o.status) if o.error is None else "transport error"
            statuses[key] = statuses.get(key, 0) + 1
        by_kind[kind] = {
            "clients": len(mine), "statuses": statuses,
            "p50_ms": round(1000 * lat[len(lat) // 2], 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
        }
    good = [o for o in outcomes if o.job.kind in ("plain", "compact", "stream") and o.status == 200]
    tokens = sum(len(o.reply["output_ids"]) for o in good)
    return {
        "clients": len(outcomes), "wall_s": round(wall, 3), "requests_per_s": round(len(outcomes) / wall, 1),
        "output_tokens_per_s": round(tokens / wall, 1), "transport_errors": sum(o.error is not None for o in outcomes),
        "by_kind": by_kind,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)

    from rollout.engine.engine import Engine
    from rollout.moe_spec import read_config
    from rollout.serve.server import R3Server

    server = R3Server(Engine(args.model, device=args.device), args.model, port=0)
    server.start_background()
    vocab = int(read_config(args.model)["vocab_size"])
    rounds = []
    try:
        for r in range(args.rounds):
            outcomes, wall = run_load("127.0.0.1", server.port, make_jobs(args.clients, vocab, seed=r))
            rounds.append(summarize(outcomes, wall))
    finally:
        server.shutdown()
    report = {"model": str(args.model), "device": args.device, "clients": args.clients, "rounds": rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'round':>5} {'clients':>7} {'wall s':>7} {'req/s':>7} {'tok/s':>7} {'resets':>6} "
          f"{'plain p50/p99 ms':>17} {'stream p50/p99 ms':>18}")
    for i, r in enumerate(rounds):
        k = r["by_kind"]
        print(f"{i:>5} {r['clients']:>7} {r['wall_s']:>7} {r['requests_per_s']:>7} {r['output_tokens_per_s']:>7} "
              f"{r['transport_errors']:>6} {k['plain']['p50_ms']:>8}/{k['plain']['p99_ms']:<8} "
              f"{k['stream']['p50_ms']:>8}/{k['stream']['p99_ms']:<9}")
    return 0 if all(r["transport_errors"] == 0 for r in rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
