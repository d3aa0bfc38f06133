"""One rank of a 2-process Ulysses sequence-parallel run of verl's FSDP engine (CPU, gloo).

Spawned processes start from scratch, so this module selects the CPU platform
before anything imports verl's engine (as ``conftest.py`` does for the parent).
Assertions run inside each rank; a failure fails ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import os

import torch
from verl.plugin.platform.platform_manager import set_platform

from cpu_platform import PlatformCPU

set_platform(PlatformCPU())
os.environ["VERL_ENGINE_DEVICE"] = "cuda"

import verl_harness as vh  # noqa: E402
from rollout.moe_spec import MoESpec  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

SP = 2


def run(rank: int, port: int, model_dir: str) -> None:
    """R3 then R2 under Ulysses SP 2, then R3 with plain FSDP2 data parallel, in one process pair:
    spawning is the slow part on CPU."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(SP), LOCAL_RANK=str(rank)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=SP)
    try:
        for mode in ("R3", "R2"):
            run_mode(rank, model_dir, mode)
        run_data_parallel(rank, model_dir)
    finally:
        torch.distributed.destroy_process_group()


def run_mode(rank: int, model_dir: str, mode: str) -> None:
    worker = vh.make_worker(model_dir, mode, micro_batch=len(vh.LENGTHS), gradient_checkpointing=False, ulysses=SP)
    spec = MoESpec.from_pretrained(model_dir)
    rollouts = vh.random_rollouts(spec, seed=8)
    fields = vh.verl_fields(rollouts, spec)
    if mode == "R2":
        del fields["routed_experts"]
    probe = vh.RouteProbe.attach(worker.engine.module)
    out = worker.infer_batch(vh.old_logprob_batch(fields))
    probe.detach()
    seen = torch.stack([probe.ids[layer][0] for layer in range(len(spec.moe_layers))], dim=1)
    native = torch.stack(
        [probe.logits[layer][0].topk(spec.top_k, dim=-1).indices for layer in range(len(spec.moe_layers))], dim=1
    )
    ids, routed = vh.expected_packed(rollouts)
    if mode == "R3":
        check_shard(rank, seen, native, ids, routed)
    else:
        check_recording(rank, out, native, ids.shape[0])


def check_shard(rank: int, seen: torch.Tensor, native: torch.Tensor, ids: torch.Tensor, routed: torch.Tensor) -> None:
    """This rank's experts got this rank's slice of the routes, sliced like verl slices the tokens."""
    local = seen.shape[0]
    assert local * SP >= ids.shape[0] > local * (SP - 1), f"rank {rank} holds {local} of {ids.shape[0]} tokens"
    pad = local * SP - ids.shape[0]
    ids = torch.cat([ids, ids.new_zeros((pad, *ids.shape[1:]))])[rank * local : (rank + 1) * local]
    routed = torch.cat([routed, routed.new_zeros(pad)])[rank * local : (rank + 1) * local]
    assert routed.any(), f"rank {rank} has no routed rows to check"
    assert torch.equal(seen[routed], ids[routed]), f"rank {rank}: replayed ids differ from its slice of the routes"
    assert torch.equal(seen[~routed].sort(-1).values, native[~routed].sort(-1).values), f"rank {rank}: native rows"


def check_recording(rank: int, out, native: torch.Tensor, total: int) -> None:
    """R2: the recording verl returns is both ranks' native routes, gathered in token order, pad stripped."""
    shards = [torch.empty_like(native) for _ in range(SP)]
    torch.distributed.all_gather(shards, native.contiguous())
    if rank != 0:
        assert out is None  # verl collects outputs from SP rank 0 only
        return
    recorded = tu.get(out, "routed_experts")
    everything = torch.cat(shards)[:total]
    assert torch.equal(recorded.values().long().sort(-1).values, everything.sort(-1).values)


def run_data_parallel(rank: int, model_dir: str) -> None:
    """FSDP2 across both ranks (no SP): each rank's parameters are half shards, its batch its own half.

    The replayed ids equal that rank's given ids, the log-probs equal a one-process replay on the
    plain transformers model (fp32 here, so to 1e-5), and the update pass replays the same routes
    (PPO's KL estimate is exactly zero on every rank).
    """
    worker = vh.make_worker(model_dir, "R3", micro_batch=2, gradient_checkpointing=False)
    spec = MoESpec.from_pretrained(model_dir)
    rollouts = vh.random_rollouts(spec, seed=9)[rank::SP]
    fields = vh.verl_fields(rollouts, spec)
    probe = vh.RouteProbe.attach(worker.engine.module)
    td = vh.old_logprob_batch(fields)
    out = worker.infer_batch(td)
    probe.detach()
    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=1)
    for i, (seq, ref) in enumerate(zip(tu.get(out, "log_probs").unbind(), vh.direct_replay_logprobs(model_dir, rollouts))):
        torch.testing.assert_close(seq[:-1], ref, rtol=1e-5, atol=1e-5, msg=f"rank {rank} sequence {i}")
    old = no_padding_2_padding(tu.get(out, "log_probs"), td)
    update = vh.update_batch(fields, old, torch.ones_like(old))
    tu.assign_non_tensor(update, mini_batch_size=SP * len(rollouts), global_batch_size=SP * len(rollouts))  # both ranks' rows
    metrics = tu.get(worker.train_mini_batch(update), "metrics")
    assert abs(float(metrics["actor/ppo_kl"][0])) < 1e-6, f"rank {rank}: update pass did not replay the same routes"
