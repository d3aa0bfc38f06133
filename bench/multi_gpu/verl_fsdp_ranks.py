"""Issue 17 (2): verl's FSDP2 engine on two GPUs with the plugin (R3), data parallel and Ulysses SP 2, against one rank.

Three phases, each a fresh set of processes (NCCL, bf16 autocast with fp32 reduce, remove-padding,
sdpa attention, the plugin loaded through ``external_lib`` by verl's own ``HFModelConfig``):

* ``world1``: one rank, the whole batch: the reference log-probs;
* ``dp2``: FSDP2 over two ranks, each rank its half of the batch;
* ``sp2``: two ranks, ``ulysses_sequence_parallel_size=2``, the whole batch on both.

On every rank the ids that reached the experts are compared with the ids given (its half of
the batch under ``dp2``, its slice of the packed sequence under ``sp2``). Log-probs are compared
with ``world1`` per sequence: max and mean |Δ|, pass within ``--tolerance`` (bf16). verl's Ulysses
exchange patches only flash-attention, which the GPU image lacks, so under ``sp2`` each rank
attends within its shard: its log-probs are reported, and are not expected to match.

Usage: ``python3 bench/multi_gpu/verl_fsdp_ranks.py --out $OUT [--model DIR]`` on a machine with
two GPUs (``nvidia-h200-x2``); the model defaults to ``bench/verl_e2e/model.py``'s. Needs verl
(``/tmp/verl-site``) and SGLang's transformers (``/tmp/sglang-site``) on ``PYTHONPATH``.
Writes ``$OUT/verl_fsdp_ranks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "trainer_bridge" / "verl"
sys.path[:0] = [str(REPO), str(HARNESS)]

BF16 = {"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
PHASES = {"world1": (1, 1), "dp2": (2, 1), "sp2": (2, 2)}  # name -> (world size, Ulysses SP size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, sp: int, port: int, model_dir: str, out_file: str) -> None:
    """One rank: replay, check the experts' ids, write this rank's log-probs as JSON (no pickle)."""
    import torch

    import verl_harness as vh
    from rollout.moe_spec import MoESpec
    from verl.utils import tensordict_utils as tu

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    try:
        spec = MoESpec.from_pretrained(model_dir)
        rollouts = vh.random_rollouts(spec, seed=0, vocab_size=json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
        index = list(range(len(rollouts)))
        if world > 1 and sp == 1:  # data parallel: this rank's half
            index = index[rank::world]
        mine = [rollouts[i] for i in index]
        worker = vh.make_worker(model_dir, "R3", micro_batch=len(mine), gradient_checkpointing=False, ulysses=sp,
                                mixed_precision=BF16)
        probe = vh.RouteProbe.attach(worker.engine.module)
        out = worker.infer_batch(vh.old_logprob_batch(vh.verl_fields(mine, spec)))
        probe.detach()
        ids, routed = vh.expected_packed(mine)
        seen = torch.stack([probe.ids[layer][0] for layer in range(len(spec.moe_layers))], dim=1).cpu()
        if sp > 1:  # this rank's slice of the packed sequence, padded as verl pads it
            local = seen.shape[0]
            pad = local * sp - ids.shape[0]
            ids = torch.cat([ids, ids.new_zeros((pad, *ids.shape[1:]))])[rank * local : (rank + 1) * local]
            routed = torch.cat([routed, routed.new_zeros(pad)])[rank * local : (rank + 1) * local]
        else:
            seen = seen[: ids.shape[0]]
        same = (seen[routed].sort(-1).values == ids[routed].sort(-1).values).all(-1)
        result = {"rank": rank, "replayed_rows": int(routed.sum()) * len(spec.moe_layers),
                  "rows_not_as_given": int((~same).sum()), "logprobs": {}}
        if out is not None and "log_probs" in out.keys():
            for i, seq in zip(index, tu.get(out, "log_probs").unbind()):
                result["logprobs"][str(i)] = seq[:-1].float().cpu().tolist()
        Path(out_file).write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def compare(reference: dict[str, list[float]], other: dict[str, list[float]]) -> dict:
    deltas = [abs(a - b) for k in reference if k in other for a, b in zip(reference[k], other[k])]
    return {"sequences": len([k for k in reference if k in other]), "max_abs": max(deltas, default=None),
            "mean_abs": sum(deltas) / len(deltas) if deltas else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--model", default="/tmp/verl-fsdp-ranks/model")
    p.add_argument("--tolerance", type=float, default=0.05, help="max |Δ log-prob| against one rank (bf16)")
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model) / "config.json").is_file():
        from bench.verl_e2e.model import make_model

        make_model(args.model)
    phases = {}
    for name, (world, sp) in PHASES.items():
        files = [str(out / f"verl-{name}-rank{r}.json") for r in range(world)]
        try:
            mp.spawn(_spawned, args=(world, sp, free_port(), args.model, files), nprocs=world)
            phases[name] = [json.loads(Path(f).read_text()) for f in files]
        except Exception as exc:  # noqa: BLE001 - a failed phase is recorded, the others still run
            phases[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    summary: dict = {"tolerance": args.tolerance, "phases": {}}
    reference = {} if isinstance(phases.get("world1"), dict) else phases["world1"][0]["logprobs"]
    for name, ranks in phases.items():
        if isinstance(ranks, dict):
            summary["phases"][name] = ranks
            continue
        logprobs = {k: v for r in ranks for k, v in r["logprobs"].items()}
        entry = {"ranks": [{k: r[k] for k in ("rank", "replayed_rows", "rows_not_as_given")} for r in ranks],
                 "ids_as_given_on_every_rank": all(r["rows_not_as_given"] == 0 and r["replayed_rows"] > 0 for r in ranks)}
        if reference and name != "world1":
            entry["logprobs_vs_world1"] = compare(reference, logprobs)
            mx = entry["logprobs_vs_world1"]["max_abs"]
            entry["logprobs_within_tolerance"] = mx is not None and mx <= args.tolerance
        summary["phases"][name] = entry
    (out / "verl_fsdp_ranks.json").write_text(json.dumps(summary, indent=1))
    print("| phase | ids as given on every rank | max |Δ logp| vs one rank | mean | within tolerance |")
    print("|---|---|---|---|---|")
    for name, e in summary["phases"].items():
        d = e.get("logprobs_vs_world1", {})
        print(f"| {name} | {e.get('ids_as_given_on_every_rank', e.get('error', '-'))} | {d.get('max_abs', '-')} | "
              f"{d.get('mean_abs', '-')} | {e.get('logprobs_within_tolerance', '-')} |")
    ok = all(isinstance(e, dict) and e.get("ids_as_given_on_every_rank") for e in summary["phases"].values())
    return 0 if ok else 1


def _spawned(rank: int, world: int, sp: int, port: int, model_dir: str, files: list[str]) -> None:
    rank_main(rank, world, sp, port, model_dir, files[rank])


if __name__ == "__main__":
    raise SystemExit(main())
