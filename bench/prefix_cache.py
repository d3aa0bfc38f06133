"""Host cost of the engine's prefix cache: insert, evict and match at rollout-batch sizes.

``python -m bench.prefix_cache`` times the current ``rollout.engine.kvcache.PrefixCache``;
``--module PATH`` times another implementation with the same API (an older kvcache.py, say,
from ``git show REV:rollout/engine/kvcache.py > /tmp/old_kvcache.py``), so the two can be
compared in one sitting on the same machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from types import ModuleType

VOCAB = 512
BATCH, GROUP, PART = 256, 8, 64  # 256 requests of 3 x 64 tokens; groups of 8 share a prompt
FILL_TOKENS = 50_000
EVICT_CALLS, EVICT_SLOTS = 50, 16


def _load(path: str | None) -> ModuleType:
    if path is None:
        from rollout.engine import kvcache

        return kvcache
    spec = importlib.util.spec_from_file_location("kvcache_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _requests(shared: bool, rng: random.Random) -> list[list[int]]:
    """Random sequences, or a shared system prompt + a prompt per group + a unique tail."""
    def run() -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(PART)]

    system = run()
    out = []
    for _ in range(BATCH // GROUP):
        prompt = run()
        out += [system + prompt + run() if shared else run() + run() + run() for _ in range(GROUP)]
    return out


def measure(kv: ModuleType, shared: bool) -> dict[str, float]:
    rng = random.Random(0)
    slots = iter(range(1, 10**9))
    payload = [(t, [next(slots) for _ in t]) for t in _requests(shared, rng)]
    cache = kv.PrefixCache()
    t0 = time.perf_counter()
    for tokens, s in payload:
        cache.insert(tokens, s)
    insert_ms = (time.perf_counter() - t0) * 1e3
    while cache.num_cached < FILL_TOKENS:
        tokens = [rng.randrange(VOCAB) for _ in range(3 * PART)]
        cache.insert(tokens, [next(slots) for _ in tokens])
    cached = cache.num_cached
    t0 = time.perf_counter()
    for _ in range(EVICT_CALLS):
        cache.evict(EVICT_SLOTS)
    evict_ms = (time.perf_counter() - t0) * 1e3 / EVICT_CALLS
    t0 = time.perf_counter()
    for tokens, _ in payload[:64]:
        cache.match(tokens)
    match_us = (time.perf_counter() - t0) * 1e6 / 64
    return {"insert_ms": insert_ms, "cached_tokens": cached, "evict_ms_per_call": evict_ms, "match_us": match_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", help="path of a kvcache.py to time instead of the installed one")
    args = p.parse_args(argv)
    kv = _load(args.module)
    for shared in (False, True):
        r = measure(kv, shared)
        print(f"{'shared-prefix' if shared else 'random':13s}: insert {BATCH}x{3 * PART} = {r['insert_ms']:.1f} ms; "
              f"evict({EVICT_SLOTS}) with {r['cached_tokens']} cached = {r['evict_ms_per_call']:.3f} ms/call; "
              f"match {3 * PART} tokens = {r['match_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
