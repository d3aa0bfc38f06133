"""``r3 train``: GRPO on a verifiable token-id task, one arm per routing mode, every arm from the same seed.

One step of one arm, in the order the data flows:

1. **rollout**: the built-in engine samples ``train.group_size`` completions of each prompt,
   with their routes and logprobs (``rollout.dtype``, overlap on);
2. **reward**: the task's verifier scores each completion (``recipes/tasks.py``), and GRPO
   normalises the scores within each prompt's group (``recipes/grpo.py``);
3. **old-logprob pass** (no grad): the transformers trainer scores the rollouts under the arm's
   routing: native, R3 (replay the rollout's routes) or R2 (record the trainer's own routes).
   The rollout-vs-trainer mismatch and the routing agreement are measured here, on the
   weights that sampled the rollouts; replay arms also score the same rollouts with native
   routing, a paired baseline that the arms' diverging training cannot move;
4. **update**: ``train.mini_batches`` optimizer steps of the clipped policy gradient with the
   rollout logprobs as the behaviour policy; R3 replays the rollout's routes, R2 the routes
   recorded in 3, native routes freely;
5. **weight sync**: the trainer's weights go into the engine with ``update_weights`` (in place,
   caches flushed). With ``train.release_memory`` the engine's KV pool (and with
   ``train.offload_weights`` its weights) leave the GPU during 3 and 4.

Arms run one after the other on one engine and one trainer model: each arm starts from the
checkpoint's weights (a host copy of the trainer's initial state, written into the trainer and,
with ``update_weights``, into the engine) and a fresh optimizer, so every arm's first rollouts
are identical.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from recipes.config import Recipe, sampling_params, to_dict
from recipes.grpo import clipped_policy_loss, group_advantages
from recipes.tasks import ResidueTask, make_task
from rollout.atomic import atomic_dir
from rollout.moe_spec import MoESpec, read_config
from rollout.types import Rollout

ARM_LABELS = {"off": "native", "r2": "R2", "r3": "R3"}


@dataclass
class TrainBatch:
    """One step's rollouts laid out for the trainer (verl's padded layout) with their rewards."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    routes: torch.Tensor  # [N, P + R, L, K], -1 = route natively
    rollout_logp: torch.Tensor  # [N, R] the engine's logprobs: the behaviour policy
    mask: torch.Tensor  # [N, R] generated tokens
    advantages: torch.Tensor  # [N, R]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return self.mask.shape[1]

    def rows(self, idx: slice) -> dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
                    position_ids=self.position_ids[idx])


def make_batch(rollouts: Sequence[Rollout], scores: torch.Tensor, group_size: int, spec: MoESpec,
               device: torch.device) -> TrainBatch:
    import trainer_bridge

    padded = trainer_bridge.pad_batch(rollouts, spec)
    P = max(len(r.prompt_ids) for r in rollouts)
    R = padded.input_ids.shape[1] - P
    rollout_logp = torch.zeros(len(rollouts), R)
    for i, r in enumerate(rollouts):
        rollout_logp[i, : len(r.output_ids)] = torch.tensor(r.output_logprobs)
    mask = padded.attention_mask[:, P:].bool()
    advantages = group_advantages(scores, group_size).unsqueeze(-1) * mask
    return TrainBatch(
        input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
        position_ids=padded.position_ids.to(device), routes=padded.routes, rollout_logp=rollout_logp.to(device),
        mask=mask.to(device), advantages=advantages.to(device), prompt_len=P,
    )


def _response_logp(model: Any, batch: TrainBatch, idx: slice) -> torch.Tensor:
    from trainer_bridge.metrics import token_logprobs

    inputs = batch.rows(idx)
    logits = model(**inputs).logits
    P, R = batch.prompt_len, batch.response_len
    return token_logprobs(logits, inputs["input_ids"])[:, P - 1 : P - 1 + R]


def _micro(n: int, size: int, begin: int = 0) -> Iterator[slice]:
    for start in range(begin, n, size):
        yield slice(start, min(start + size, n))


def old_logprob_pass(model: Any, batch: TrainBatch, arm: str, micro_batch: int, guard: str, num_moe_layers: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Trainer logprobs ``[N, R]``, the ids its experts received ``[N, S, L, K]``, and R2's recorded routes."""
    import trainer_bridge

    from recipes.pipeline import observe_expert_inputs

    logps, seen_ids, recorded = [], [], []
    n = batch.input_ids.shape[0]
    with torch.no_grad():
        for idx in _micro(n, micro_batch):
            with contextlib.ExitStack() as stack:
                seen = stack.enter_context(observe_expert_inputs(model, num_moe_layers))
                recording = stack.enter_context(trainer_bridge.record(model)) if arm == "r2" else None
                if arm == "r3":
                    stack.enter_context(trainer_bridge.replay(model, batch.routes[idx], guard=guard))
                logps.append(_response_logp(model, batch, idx).float())
                if recording is not None:
                    recorded.append(recording.routes.cpu())
            b, s = batch.input_ids[idx].shape
            seen_ids.append(torch.stack([x.reshape(b, s, -1) for x in seen], dim=2))
    return torch.cat(logps), torch.cat(seen_ids), (torch.cat(recorded) if recorded else None)


def _routing(model: Any, arm: str, routes: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The update passes' routing. Replay measures its overlap with the trainer's own top-k but never warns:
    after an optimizer step the router has moved, so disagreement there is drift, not misalignment."""
    import trainer_bridge

    if arm == "off":
        return contextlib.nullcontext()
    return trainer_bridge.replay(model, routes, guard="warn", guard_threshold=0.0)


def update(model: Any, optimizer: Any, batch: TrainBatch, arm: str, recorded: torch.Tensor | None,
           recipe: Recipe) -> dict[str, float]:
    """``train.mini_batches`` optimizer steps; returns mean grad norm, clip fraction, loss, and for replay arms
    the lowest overlap between the replayed routes and the trainer's own top-k in any layer."""
    tr, cfg = recipe.trainer, recipe.train
    n = batch.input_ids.shape[0]
    per_mini = -(-n // cfg.mini_batches)
    grad_norms, losses, clipped, tokens, overlaps = [], [], 0.0, 0.0, []
    replayed = batch.routes if arm == "r3" else recorded
    for mini in _micro(n, per_mini):
        optimizer.zero_grad(set_to_none=True)
        mini_tokens = batch.mask[mini].sum()
        mini_loss = 0.0
        for idx in _micro(mini.stop, tr.micro_batch_size, mini.start):
            with _routing(model, arm, None if replayed is None else replayed[idx]) as session:
                logp = _response_logp(model, batch, idx).float()
                out = clipped_policy_loss(logp, batch.rollout_logp[idx], batch.advantages[idx], batch.mask[idx],
                                          cfg.clip_ratio, cfg.clip_ratio_c, num_tokens=mini_tokens)
                out.loss.backward()  # inside the context: activation recomputation would replay the same routes
            if session is not None and session.agreement:
                overlaps.append(min(session.agreement.values()))
            mini_loss += float(out.loss.detach())
            clipped += float(out.clipped_tokens)
            tokens += float(out.tokens)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
        optimizer.step()
        losses.append(mini_loss)
    return {"grad_norm": float(np.mean(grad_norms)), "clip_fraction": clipped / tokens, "loss": float(np.mean(losses)),
            "replay_overlap_min": min(overlaps) if overlaps else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def train_arm(arm: str, worker: Any, model: Any, initial: dict[str, torch.Tensor], task: ResidueTask,
              recipe: Recipe, spec: MoESpec, progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every step of one arm, from the ``initial`` weights in both the trainer and the engine.

    Without progress bars each step is logged as one line, so a run cut short still shows what it measured.
    """
    from tqdm import tqdm

    from trainer_bridge.metrics import logprob_mismatch, routing_agreement

    ro, tr, cfg = recipe.rollout, recipe.trainer, recipe.train
    device = torch.device(tr.device)
    model.load_state_dict(initial)
    worker.update_weights(initial, version=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    base = sampling_params(ro.sampling)
    per_step = ro.num_prompts * cfg.group_size
    records = []
    bar = tqdm(range(cfg.steps), desc=f"train {ARM_LABELS[arm]}", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        timer = _Timer(device)
        prompts = task.prompts(ro.num_prompts, ro.prompts.length, seed=ro.prompts.seed + step)
        group_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        seeds = [None if base.seed is None else base.seed + step * per_step + i for i in range(per_step)]
        with timer("rollout"):
            rollouts = worker.generate(group_prompts, [replace(base, seed=s) for s in seeds])
        with timer("memory"):
            if cfg.release_memory:
                worker.release_memory(weights=cfg.offload_weights)
        scores = torch.tensor([task.reward(r.prompt_ids, r.output_ids) for r in rollouts], dtype=torch.float32)
        with timer("trainer"):
            batch = make_batch(rollouts, scores, cfg.group_size, spec, device)
            trainer_logp, seen, recorded = old_logprob_pass(model, batch, arm, tr.micro_batch_size, tr.guard,
                                                            len(spec.moe_layers))
            # the same rollouts scored with native routing: a paired baseline that training divergence cannot move
            native_logp = trainer_logp if arm == "off" else old_logprob_pass(
                model, batch, "off", tr.micro_batch_size, tr.guard, len(spec.moe_layers))[0]
            stats = update(model, optimizer, batch, arm, recorded, recipe)
        with timer("weight_sync"):
            worker.update_weights(model.state_dict(), version=step + 1)
        with timer("memory"):
            if cfg.release_memory:
                worker.resume_memory()
        mask = batch.mask.cpu()
        mismatch = logprob_mismatch(batch.rollout_logp.cpu(), trainer_logp.cpu(), mask)
        native_mismatch = logprob_mismatch(batch.rollout_logp.cpu(), native_logp.cpu(), mask)
        agreement = routing_agreement(seen.cpu(), batch.routes, batch.attention_mask.cpu())
        generated = sum(len(r.output_ids) for r in rollouts)
        records.append({
            "arm": arm, "label": ARM_LABELS[arm], "step": step,
            "weight_version": rollouts[0].weight_version,
            "reward": float(scores.mean()), "reward_std": float(scores.std()),
            "k3_kl": mismatch["k3_kl"], "k3_kl_native_same_rollouts": native_mismatch["k3_kl"],
            "mean_abs_logprob_diff": mismatch["mean_abs"],
            "max_abs_logprob_diff": mismatch["max_abs"], "ratio_outside": mismatch["ratio_outside"],
            "routing_agreement": float(agreement.mean()), **stats,
            "sequences": len(rollouts), "generated_tokens": generated,
            "rollout_tokens_per_second": generated / timer.seconds["rollout"],
            **{f"time_{k}": v for k, v in timer.seconds.items()},
        })
        bar.set_postfix(reward=f"{records[-1]['reward']:.3f}", k3=f"{mismatch['k3_kl']:.2e}")
        if not progress:
            r = records[-1]
            log(f"{ARM_LABELS[arm]} step {step}: reward {r['reward']:.3f} k3 {r['k3_kl']:.2e} agreement "
                f"{r['routing_agreement']:.4%} | s: rollout {r['time_rollout']:.2f} trainer {r['time_trainer']:.2f} "
                f"sync {r['time_weight_sync']:.3f} memory {r['time_memory']:.3f} | {r['rollout_tokens_per_second']:.0f} tok/s")
    del optimizer  # its state is as large as the weights twice over: gone before the next arm's
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def run_training(recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every arm of ``recipe``; writes ``metrics.jsonl``, ``report.json``, ``report.md`` and ``report.png``.
    ``progress=False`` silences every bar, transformers' included."""
    from recipes.progress import library_bars

    with library_bars(progress):
        return _train(recipe, progress, log)


def _train(recipe: Recipe, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from recipes.pipeline import resolve_model
    from recipes.train_report import summarize, table, write_outputs
    from rollout.worker import RolloutWorker

    if recipe.rollout.prompts.source != "synthetic":
        raise ValueError("rollout.prompts.source: r3 train makes its prompts from train.task; use synthetic")
    name = recipe.model.name
    from rollout.presets import PRESETS

    vocab = int((PRESETS[name] if name in PRESETS else read_config(name))["vocab_size"])
    task = make_task(recipe.train.task, recipe.train.modulus, vocab)
    model_dir = resolve_model(recipe)
    spec = MoESpec.from_pretrained(model_dir)
    ro = recipe.rollout
    log(f"model {model_dir}; arms {', '.join(ARM_LABELS[a] for a in recipe.train.arms)}; "
        f"{recipe.train.steps} steps of {ro.num_prompts} prompts x {recipe.train.group_size} completions")
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    tr = recipe.trainer
    with atomic_dir(Path(recipe.output.dir)) as tmp:
        with RolloutWorker(
            model_dir, device=ro.device, dtype=ro.dtype, overlap=ro.overlap, return_routed_experts=True,
            max_running_requests=ro.max_running_requests, max_batch_tokens=ro.max_batch_tokens, kv_slots=ro.kv_slots,
        ) as worker:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, tr.dtype)).to(tr.device).train()
            initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            for arm in recipe.train.arms:
                records += train_arm(arm, worker, model, initial, task, recipe, spec, progress, log)
        summary = summarize(records, recipe.train.arms, run={
            "model": str(model_dir), "recipe": to_dict(recipe), "seconds": time.perf_counter() - started,
        })
        write_outputs(tmp, records, summary)
    log(table(summary))
    log(f"wrote {recipe.output.dir}/ (metrics.jsonl, report.json, report.md, report.png)")
    return summary
