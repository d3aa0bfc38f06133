"""288 concurrent clients on fresh connections against r3 serve (127.0.0.1): plain, compact, streamed, hung up, bad.

Every good reply's routes equal a transformers forward over its own tokens; every bad body gets
a 400 naming its problem; no client sees a reset or a refused connection; the clients that hung
up mid-stream leave no request running in the engine. Bounded: tiny model, a few new tokens.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rollout.engine.engine import Engine
from rollout.moe_spec import MoESpec, read_config
from rollout.serve.server import R3Server
from rollout.sglang.protocol import decode_reply

CLIENTS = 288


def _load_module():
    path = Path(__file__).resolve().parents[3] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_hundreds_of_concurrent_clients(model):
    load = _load_module()
    engine = Engine(model)
    server = R3Server(engine, model, port=0)
    server.start_background()
    try:
        jobs = load.make_jobs(CLIENTS, int(read_config(model)["vocab_size"]), seed=1)
        outcomes, wall = load.run_load("127.0.0.1", server.port, jobs)
        deadline = time.perf_counter() + 20
        while engine.has_unfinished() and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert not engine.has_unfinished(), "requests of clients that hung up are still running"
    finally:
        server.shutdown()
    summary = load.summarize(outcomes, wall)
    assert summary["transport_errors"] == 0, [o.error for o in outcomes if o.error][:5]
    assert {k: v["clients"] for k, v in summary["by_kind"].items()}.keys() == set(load.KINDS)

    spec = MoESpec.from_pretrained(model)
    good = []
    for o in outcomes:
        if o.job.kind == "bad":
            assert o.status == 400 and o.job.bad_message in o.reply["error"]["message"], (o.job.bad_body[:80], o.reply)
        elif o.job.kind == "hangup":
            assert o.status == 200 and o.extra["first_chunk"] == b"data: "
        else:
            assert o.status == 200, o.reply
            if o.job.kind == "stream":
                assert o.extra["done"] and o.chunks >= 1
                for partial in o.extra["partials"]:  # cumulative: every chunk a prefix of the final tokens
                    assert o.reply["output_ids"][: len(partial["output_ids"])] == partial["output_ids"]
            rollout = decode_reply(o.reply, o.job.prompt, spec)
            assert len(rollout.output_ids) == o.job.sampling["max_new_tokens"]
            good.append(rollout)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        for r in good:
            out = hf(torch.tensor([r.token_ids[:-1]]), output_router_logits=True)
            top = torch.stack([lg.topk(spec.top_k, dim=-1).indices for lg in out.router_logits], dim=1)
            assert np.array_equal(np.sort(r.routed_experts.ids, -1), np.sort(top.numpy(), -1))
