"""Bytes per token of routes on each wire path, measured on the bytes the code actually produces.

* ``sglang-int32``: SGLang 0.5.x's ``meta_info.routed_experts`` (base64 of int32, every layer),
  which is also what ``r3 serve`` sends by default;
* ``sglang-uint8/uint16``: newer SGLang launched with ``SGLANG_ROUTED_EXPERTS_DTYPE``;
* ``r3-compact``: ``r3 serve`` with ``"routed_experts_format": "r3"`` (``RoutedExperts.to_base64``:
  uint8/uint16, MoE layers only, 32-byte header and CRC32);
* ``memory/file``: the compact ids as the host cache and the rollout file hold them.

For each model shape the routes of a ``--tokens``-token sequence go through ``build_reply``
(the function ``r3 serve`` answers with) and the decoders; with ``--model`` the same is
measured end to end over HTTP against an in-process ``r3 serve`` on that checkpoint.

    python bench/wire_bytes.py [--tokens 1000] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

import numpy as np

from rollout.moe_spec import MoESpec
from rollout.routed_experts import SGLANG_WIRE_DTYPES, RoutedExperts
from rollout.sglang.protocol import ROUTES_R3, ROUTES_SGLANG, GenerateItem, build_reply
from rollout.types import FINISH_LENGTH, Rollout, SamplingParams

# (name, model_type, num_hidden_layers, moe_layers, num_experts, top_k)
SHAPES = [
    ("Qwen3-30B-A3B", "qwen3_moe", 48, tuple(range(48)), 128, 8),
    ("DeepSeek-V3", "deepseek_v3", 61, tuple(range(3, 61)), 256, 8),
]


def _routes(spec: MoESpec, tokens: int, seed: int = 0) -> RoutedExperts:
    rng = np.random.default_rng(seed)
    keys = rng.random((tokens, len(spec.moe_layers), spec.num_experts))
    ids = np.argpartition(keys, spec.top_k - 1, axis=-1)[..., : spec.top_k]
    return RoutedExperts(ids, spec.num_experts, spec.moe_layers)


def measure_shape(spec: MoESpec, tokens: int) -> dict[str, float]:
    """Bytes per routed token of each encoding for ``tokens`` rows of this shape."""
    routes = _routes(spec, tokens)
    prompt = [1] * (tokens + 1 - 4)
    rollout = Rollout(prompt, [2, 3, 4, 5], [-1.0] * 4, FINISH_LENGTH, routes)
    out = {}
    for fmt, name in ((ROUTES_SGLANG, "sglang-int32 (r3 serve default)"), (ROUTES_R3, "r3-compact")):
        item = GenerateItem(prompt, SamplingParams(4), False, True, 0, "x", fmt)
        reply = build_reply(item, rollout, spec, capture=True)
        out[name] = len(reply["meta_info"]["routed_experts"]) / tokens
    full = np.zeros((tokens, spec.num_hidden_layers, spec.top_k), np.int64)
    full[:, list(spec.moe_layers)] = routes.to_int32()
    for wire in ("uint16", "uint8"):
        if spec.num_experts - 1 <= np.iinfo(SGLANG_WIRE_DTYPES[wire]).max:
            b64 = base64.b64encode(full.astype(SGLANG_WIRE_DTYPES[wire]).tobytes()).decode()
            back = RoutedExperts.from_sglang(b64, num_experts=spec.num_experts, num_hidden_layers=spec.num_hidden_layers,
                                             top_k=spec.top_k, moe_layers=spec.moe_layers, wire_dtype=wire)
            assert back == routes
            out[f"sglang-{wire} (newer SGLang)"] = len(b64) / tokens
    out["memory/file (compact ids)"] = routes.nbytes / tokens
    return out


def measure_http(model: str, new_tokens: int = 64) -> dict[str, float]:
    """Over HTTP against r3 serve on ``model``: routes characters per row, both formats."""
    from rollout.engine.engine import Engine
    from rollout.serve.server import R3Server
    from rollout.sglang.http_client import HTTPClient

    server = R3Server(Engine(model), model, port=0)
    server.start_background()
    try:
        client = HTTPClient(server.url, max_retries=0)
        body = {"input_ids": list(range(1, 33)), "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0},
                "return_routed_experts": True}
        rows = 32 + new_tokens - 1
        out = {}
        for fmt, name in ((ROUTES_SGLANG, "sglang-int32 (r3 serve default)"), (ROUTES_R3, "r3-compact")):
            reply = client.post_json("/generate", {**body, "routed_experts_format": fmt})
            out[name] = len(reply["meta_info"]["routed_experts"]) / rows
            out[f"{name}: whole reply"] = len(json.dumps(reply)) / rows
    finally:
        server.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--model", default=None, help="also measure over HTTP against r3 serve on this checkpoint")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    report: dict[str, dict[str, float]] = {}
    for name, model_type, layers, moe, experts, top_k in SHAPES:
        report[f"{name} ({len(moe)} MoE layers x top-{top_k} of {experts})"] = measure_shape(
            MoESpec(model_type, layers, moe, experts, top_k), args.tokens
        )
    if args.model:
        spec = MoESpec.from_pretrained(args.model)
        label = f"{Path(args.model).name} ({len(spec.moe_layers)} MoE layers x top-{spec.top_k} of {spec.num_experts})"
        report[f"{label}, over HTTP"] = measure_http(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wire_bytes.json").write_text(json.dumps(report, indent=2) + "\n")
    for shape, paths in report.items():
        print(shape)
        for path, per_token in paths.items():
            print(f"  {path:<45} {per_token:9.1f} B/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
