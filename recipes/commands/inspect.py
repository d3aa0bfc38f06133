"""``r3 inspect FILE [--model DIR]``: what a rollout file holds, and how its routes compare with a model's own."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from recipes.config import DTYPES
from recipes.report import rollout_stats
from rollout.rollout_file import load_rollouts
from rollout.types import Rollout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="rollout file (r3-rollouts safetensors)")
    p.add_argument("--model", help="checkpoint to compare the routes with (must be the model that made them)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the comparison forward")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def summarize(rollouts: Sequence[Rollout], header: Any) -> dict[str, Any]:
    return {
        **rollout_stats(rollouts),
        "moe_layers": None if header.moe_layers is None else list(header.moe_layers),
        "top_k": header.top_k,
        "num_experts": header.num_experts,
        "model_fingerprint": header.model_fingerprint,
        "format_version": header.format_version,
    }


def native_agreement(
    model_dir: str, rollouts: Sequence[Rollout], dtype: str, micro_batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per MoE layer: routed rows where the model's own top-k (transformers forward) equals the file's, and all routed rows."""
    import torch
    from transformers import AutoModelForCausalLM

    import trainer_bridge
    from rollout.moe_spec import MoESpec
    from trainer_bridge.metrics import routing_agreement

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    spec = MoESpec.from_config(model.config)
    same = np.zeros(len(spec.moe_layers))
    total = np.zeros(len(spec.moe_layers))
    with torch.no_grad():
        for begin in range(0, len(rollouts), micro_batch_size):
            batch = trainer_bridge.pad_batch(rollouts[begin : begin + micro_batch_size], spec)
            with trainer_bridge.record(model) as recording:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
            valid = (batch.routes[..., 0] >= 0).reshape(-1, len(spec.moe_layers)).sum(0).numpy()
            share = routing_agreement(recording.routes, batch.routes).numpy()
            same += np.nan_to_num(share) * valid
            total += valid
    return same, total


def run(args: argparse.Namespace) -> int:
    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    rollouts, header = load_rollouts(args.file)
    info = summarize(rollouts, header)
    if args.model:
        from rollout.moe_spec import MoESpec
        from rollout.rollout_file import model_fingerprint

        fingerprint = model_fingerprint(args.model)
        if header.model_fingerprint is not None and header.model_fingerprint != fingerprint:
            raise ValueError(
                f"{args.file} was recorded on model {header.model_fingerprint}, but {args.model} is {fingerprint}: "
                "its routes do not belong to this model (the recipes' demo model is "
                "`r3 init-model --preset NAME --init unit-scale --seed N`, not the preset's own init)"
            )
        spec = MoESpec.from_pretrained(args.model)
        for i, r in enumerate(rollouts):
            if r.routed_experts is not None:
                spec.check(r.routed_experts, what=f"routes of sequence {i}")
        if info["sequences_with_routes"]:
            from recipes.progress import library_bars

            with library_bars(not args.no_progress):
                same, total = native_agreement(args.model, rollouts, args.dtype, args.micro_batch_size)
            info["native_routing_agreement"] = float(same.sum() / max(total.sum(), 1))
            info["native_routing_agreement_per_layer"] = [float(x) for x in same / np.maximum(total, 1)]
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {_shown(key, value)}")
    return 0


def _shown(key: str, value: Any) -> str:
    """Agreements as percentages with their definition; every other value as it is."""
    if key == "native_routing_agreement":
        return (f"{value:.4%}  (token-weighted: share of all routed (token, MoE layer) rows where the model's own "
                "top-k set equals the file's)")
    if key == "native_routing_agreement_per_layer":
        return f"[{', '.join(f'{x:.4%}' for x in value)}]  (the same share within each MoE layer)"
    return str(value)
