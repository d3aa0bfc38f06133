"""A warm-up before the first request: every step shape a real batch can take, run once, then forgotten.

Triton compiles a kernel once per *specialisation* of its arguments (an integer equal to 1 or
divisible by 16, a pointer aligned to 16 bytes), not once per kernel. A prefill batch that
exactly fills ``max_batch_tokens`` with whole prompts never meets a split chunk, a one-token
chunk or a cached prefix; the first batch that does pays the compiles inside a request. On the
H200 (2026-12-02, ``bench/results/2026-12-02-h200``) a one-token prefix hit turned the first two
prefill steps of a batch of 256 from 0.03 s into 0.45 s and 0.38 s each.

So the engine runs two synthetic rounds at start-up, then empties the prefix cache and the route
rows and zeroes the counters, so nothing of it reaches a request or ``Engine.stats``:

1. prompts that fill the first step up to one token short, plus a short prompt whose first token
   closes the step: a one-token chunk, then its continuation beside the others' first decode;
2. prompts that share one token and half a prompt with round 1: prefix-cache hits of both sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rollout.engine.weight_update import flush_caches
from rollout.types import SamplingParams

if TYPE_CHECKING:
    from rollout.engine.engine import Engine

WARMUP_NEW_TOKENS = 2  # a sampled token, then one decode step
TAIL_PROMPT_LEN = 3  # the short prompt split across the first two steps


def warmup_prompts(max_batch_tokens: int, max_context: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """The two rounds' prompts: round 1 fills one step to the last token and splits a short prompt across it."""
    longest = max(2, min(max_context - WARMUP_NEW_TOKENS - 1, max_batch_tokens - 1))
    fill, first = max_batch_tokens - 1, []
    while fill > 0:
        n = min(longest, fill)
        start = 1 + sum(map(len, first))
        first.append([(start + i) % vocab for i in range(n)])
        fill -= n
    first.append([(vocab // 2 + i) % vocab for i in range(TAIL_PROMPT_LEN)])
    head = first[0]
    half = max(1, len(head) // 2)
    second = [[head[0], (head[1] + 1) % vocab if len(head) > 1 else 0],
              head[:half] + [(head[half - 1] + 7) % vocab]]
    return first, second


def warm_up(engine: "Engine") -> dict[str, int]:
    """Run both rounds, then leave the engine as it was built. Returns what the rounds exercised."""
    first, second = warmup_prompts(engine.config.max_batch_tokens, engine.max_context, engine.model.arch.vocab_size)
    if sum(map(len, first + second)) + len(first + second) * WARMUP_NEW_TOKENS > engine.slots.num_free:
        return {"skipped": 1}  # a pool this small serves tiny batches only; nothing to warm
    sampling = SamplingParams(max_new_tokens=WARMUP_NEW_TOKENS, temperature=1.0, seed=0)
    launch = engine._launch_or_fail
    steps = one_token_chunks = 0

    def counting_launch(batch):
        nonlocal steps, one_token_chunks
        steps += 1
        one_token_chunks += sum(n == 1 and not s for n, s in zip(batch.extend_lens, batch.samples))
        return launch(batch)

    engine._launch_or_fail = counting_launch  # type: ignore[method-assign]
    try:
        engine.generate(first, sampling)
        engine.generate(second, sampling)
    finally:
        del engine._launch_or_fail
    s = engine.scheduler
    report = {"steps": steps, "one_token_chunks": one_token_chunks, "prefix_hit_tokens": s.prefix_hit_tokens}
    flush_caches(engine)
    s.prefix_hit_tokens = s.computed_tokens = s.num_preemptions = 0
    return report
