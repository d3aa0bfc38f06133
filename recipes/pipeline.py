"""The main job: rollout with routes, trainer logprobs with native routing and with replay, a report.

Everything lands in a scratch directory that replaces ``output.dir`` in one
rename at the end, so an interrupted run leaves no half-written output; the
recipe was validated before this module runs, so a bad recipe writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from recipes.config import Recipe, RecipeError, sampling_params, to_dict
from recipes.report import Condition, build_report, rollout_stats, table, write_report
from rollout.atomic import atomic_dir
from rollout.moe_spec import MoESpec, read_config
from rollout.rollout_file import model_fingerprint, save_rollouts
from rollout.types import Rollout

ROLLOUT_FILE = "rollouts.safetensors"


# ------------------------------------------------------------------- inputs
def resolve_model(recipe: Recipe) -> Path:
    """The checkpoint directory, made (atomically, once) when the recipe names a preset."""
    from rollout.presets import PRESETS, init_model

    from recipes.demo_model import ensure_demo_model

    model = recipe.model
    if model.name not in PRESETS:
        return Path(model.name)
    if model.init == "unit-scale":
        return ensure_demo_model(model.dir, model.name, model.seed)
    path = Path(model.dir) / f"{model.name}-seed{model.seed}"
    if not (path / "config.json").is_file():
        init_model(model.name, path, seed=model.seed, device=recipe.rollout.device)  # bench sizes: draw on the GPU
    return path


def prompt_problem(config: Mapping[str, Any]) -> Callable[[list[int]], str | None]:
    """What is wrong with a prompt for the model of ``config`` (``None``: nothing), without loading it.

    The engine would refuse the same prompts, but only after loading its weights and
    starting a progress bar; the commands ask here first.
    """
    from rollout.engine.models import arch_from_config

    arch = arch_from_config(dict(config))  # an engine-unsupported family fails here too

    def problem(ids: list[int]) -> str | None:
        bad = next((t for t in ids if t >= arch.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the model's vocabulary [0, {arch.vocab_size})"
        if len(ids) >= arch.max_positions:
            return (f"prompt of {len(ids)} tokens does not fit the model's context of {arch.max_positions} tokens "
                    "(it needs room for at least one new token)")
        return None

    return problem


def read_prompts_jsonl(
    path: str | Path, limit: int | None = None, model_config: Mapping[str, Any] | None = None
) -> list[list[int]]:
    """``{"input_ids": [...]}`` per line; blank lines are skipped, anything else is an error naming the line.

    With ``model_config`` every prompt is also checked against that model's vocabulary and context.
    """
    problem = prompt_problem(model_config) if model_config is not None else None
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            ids = item.get("input_ids") if isinstance(item, dict) else None
            if (not isinstance(ids, list) or not ids
                    or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids)):
                raise ValueError(f'{path}:{number}: expected {{"input_ids": [non-negative ints, ...]}}')
            wrong = problem(ids) if problem is not None else None
            if wrong is not None:
                raise ValueError(f"{path}:{number}: {wrong}")
            prompts.append(ids)
            if limit is not None and len(prompts) == limit:
                break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def recipe_prompts(recipe: Recipe) -> list[list[int]]:
    """The prompts, read before any model is made, so a bad prompt file costs nothing."""
    from recipes.demo_model import synthetic_prompts
    from rollout.presets import PRESETS, make_config

    cfg = recipe.rollout.prompts
    name = recipe.model.name
    config = make_config(name).to_dict() if name in PRESETS else read_config(name)
    if cfg.source == "jsonl":
        return read_prompts_jsonl(cfg.path, recipe.rollout.num_prompts, model_config=config)
    prompts = synthetic_prompts(recipe.rollout.num_prompts, cfg.length, int(config["vocab_size"]), cfg.seed)
    wrong = prompt_problem(config)(prompts[0])  # all have the same length and in-vocabulary ids
    if wrong is not None:
        raise RecipeError("rollout.prompts.length", wrong)
    return prompts


# ------------------------------------------------------------------ rollout
def generate(
    model_dir: Path, recipe: Recipe, prompts: list[list[int]], progress: bool = True
) -> tuple[list[Rollout], float]:
    """Rollouts in prompt order and the wall time of generating them (engine start-up excluded).

    The bar counts generated tokens: sequences of one batch all finish on the same last
    steps, so a count of finished sequences would sit at 0% and then jump.
    """
    from dataclasses import replace

    from recipes.progress import bar
    from rollout.worker import RolloutWorker

    ro = recipe.rollout
    base = sampling_params(ro.sampling)
    samplings = [base if base.seed is None else replace(base, seed=base.seed + i) for i in range(len(prompts))]
    with RolloutWorker(
        model_dir, engine=ro.engine, device=ro.device, dtype=ro.dtype, overlap=ro.overlap,
        return_routed_experts=True, max_running_requests=ro.max_running_requests,
        max_batch_tokens=ro.max_batch_tokens, kv_slots=ro.kv_slots,
    ) as worker:
        engine = worker.backend
        start = time.perf_counter()
        # The engine's own request/step loop (what generate() does), so the bar moves with every step.
        order = {}
        for i, (p, s) in enumerate(zip(prompts, samplings)):
            try:
                order[engine.add_request(p, s)] = i
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        done: dict[int, Rollout] = {}
        with bar("rollout", total=sum(s.max_new_tokens for s in samplings), unit="tok", enabled=progress) as shown:
            while len(done) < len(order):
                for rid, rollout in engine.step():
                    if rid in order:
                        done[order[rid]] = rollout
                        shown.total -= samplings[order[rid]].max_new_tokens - len(rollout.output_ids)  # ended early
                running = (engine.progress(rid) for rid, i in order.items() if i not in done)
                generated = sum(len(r.output_ids) for r in done.values()) + sum(len(p[0]) for p in running if p)
                shown.update(generated - shown.n)
        seconds = time.perf_counter() - start
    return [done[i] for i in range(len(prompts))], seconds


# ------------------------------------------------------------------ trainer
@contextlib.contextmanager
def observe_expert_inputs(model: Any, num_moe_layers: int) -> Iterator[list[Any]]:
    """Collect the top-k ids each MoE block hands its experts module, independently of replay's interception.

    The experts modules are the ones ``trainer_bridge``'s discovery finds; transformers 5 MoE blocks call
    ``experts(hidden_states, top_k_index, top_k_weights)``; a model built otherwise is refused, since the
    replay check would be hollow.
    """
    from trainer_bridge.routers import moe_blocks_of

    modules = [b.experts[0] for b in moe_blocks_of(model)[1] if len(b.experts) == 1]
    if len(modules) != num_moe_layers:
        raise ValueError(
            f"found {len(modules)} MoE blocks with one experts module for {num_moe_layers} MoE layers: cannot "
            "observe the ids reaching the experts"
        )
    seen: list[Any] = []

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        if len(args) < 2:
            raise ValueError(f"{type(module).__name__} was not called as experts(hidden_states, top_k_index, ...)")
        seen.append(args[1].detach().to("cpu", copy=True))

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def trainer_logprobs(
    model_dir: Path, recipe: Recipe, rollouts: Sequence[Rollout], progress: bool = True
) -> dict[str, Any]:
    """Native and replayed trainer forwards over the rollouts, in micro-batches (the bar counts forwards)."""
    import torch
    from transformers import AutoModelForCausalLM

    import trainer_bridge
    from recipes.progress import bar
    from trainer_bridge.metrics import token_logprobs

    tr = recipe.trainer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, tr.dtype)).to(tr.device).eval()
    spec = MoESpec.from_config(model.config)
    L = len(spec.moe_layers)
    out: dict[str, list[np.ndarray]] = {k: [] for k in (
        "rollout_logp", "native_logp", "replay_logp", "rollout_routes", "native_routes", "replay_routes")}

    def forward(batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Response logprobs [B, R] and the ids the experts received [B, S, L, K]."""
        input_ids = batch.input_ids.to(tr.device)
        with observe_expert_inputs(model, L) as seen:
            logits = model(input_ids=input_ids, attention_mask=batch.attention_mask.to(tr.device),
                           position_ids=batch.position_ids.to(tr.device)).logits
        B, S = batch.input_ids.shape
        ids = torch.stack([s.reshape(B, S, -1) for s in seen], dim=2)
        return token_logprobs(logits, input_ids).float().cpu().numpy(), ids.numpy()

    guard = None if tr.replay == "off" else {"mode": tr.guard, "threshold": None, "lowest_overlap": None, "warnings": 0}
    micro_batches = -(-len(rollouts) // tr.micro_batch_size)
    passes = 1 if tr.replay == "off" else 2
    with torch.no_grad(), bar("trainer", total=micro_batches * passes, unit="forward", enabled=progress) as shown:
        for begin in range(0, len(rollouts), tr.micro_batch_size):
            mb = rollouts[begin : begin + tr.micro_batch_size]
            batch = trainer_bridge.pad_batch(mb, spec)
            P = max(len(r.prompt_ids) for r in mb)
            R = batch.input_ids.shape[1] - P
            resp_mask = batch.attention_mask[:, P:].bool().numpy()
            row_mask = (batch.routes[..., 0, 0] >= 0).numpy()  # rows the rollout routed
            rollout_lp = np.zeros((len(mb), R), np.float32)
            for i, r in enumerate(mb):
                rollout_lp[i, : len(r.output_ids)] = r.output_logprobs
            native_lp, native_ids = forward(batch)
            shown.update(1)
            out["rollout_logp"].append(rollout_lp[resp_mask])
            out["native_logp"].append(native_lp[:, P - 1 : P - 1 + R][resp_mask])
            out["rollout_routes"].append(batch.routes.numpy()[row_mask])
            out["native_routes"].append(native_ids[row_mask])
            if tr.replay == "off":
                continue
            routes = batch.routes if tr.replay == "r3" else torch.from_numpy(native_ids)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", trainer_bridge.RouteMisalignmentWarning)
                with trainer_bridge.replay(model, routes, guard=tr.guard) as session:
                    replay_lp, replay_ids = forward(batch)
            _note_guard(guard, session, caught)
            shown.update(1)
            out["replay_logp"].append(replay_lp[:, P - 1 : P - 1 + R][resp_mask])
            out["replay_routes"].append(replay_ids[row_mask])
    return {**{k: (np.concatenate(v) if v else None) for k, v in out.items()}, "guard": guard}


def _note_guard(guard: dict[str, Any], session: Any, caught: list[warnings.WarningMessage]) -> None:
    """Fold one replayed forward's guard result into ``guard``; the warnings still reach the user."""
    from trainer_bridge import RouteMisalignmentWarning

    guard["threshold"] = session.guard.threshold
    overlaps = list(session.agreement.values())
    if overlaps:
        lowest = min(overlaps) if guard["lowest_overlap"] is None else min(guard["lowest_overlap"], *overlaps)
        guard["lowest_overlap"] = float(lowest)
    for w in caught:
        guard["warnings"] += issubclass(w.category, RouteMisalignmentWarning)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _condition(label: str, rollout_routes: np.ndarray, routes: np.ndarray, rollout_logp: np.ndarray,
               logp: np.ndarray) -> Condition:
    from trainer_bridge.metrics import logprob_mismatch, routing_agreement

    return Condition(
        label=label,
        layer_agreement=routing_agreement(routes, rollout_routes).numpy(),
        abs_logprob_diff=np.abs(rollout_logp.astype(np.float64) - logp),
        mismatch=logprob_mismatch(rollout_logp, logp),
    )


# ---------------------------------------------------------------------- run
def run_recipe(recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``recipe`` end to end; returns ``report.json``'s content. ``progress=False`` silences every bar."""
    from recipes.progress import library_bars

    with library_bars(progress):
        return _run(recipe, progress, log)


def _run(recipe: Recipe, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    prompts = recipe_prompts(recipe)
    model_dir = resolve_model(recipe)
    spec = MoESpec.from_pretrained(model_dir)
    fingerprint = model_fingerprint(model_dir)
    target = Path(recipe.output.dir)
    with atomic_dir(target) as tmp:
        log(f"model {model_dir} ({fingerprint}); {len(prompts)} prompts")
        rollouts, seconds = generate(model_dir, recipe, prompts, progress)
        save_rollouts(tmp / ROLLOUT_FILE, rollouts, model_fingerprint=fingerprint, meta={"recipe": to_dict(recipe)})
        log(f"trainer: native{'' if recipe.trainer.replay == 'off' else ' and ' + recipe.trainer.replay} forwards")
        t = trainer_logprobs(model_dir, recipe, rollouts, progress)
        native = _condition("native routing", t["rollout_routes"], t["native_routes"], t["rollout_logp"],
                            t["native_logp"])
        replay = None
        if recipe.trainer.replay != "off":
            label = "R3 replay (rollout routes)" if recipe.trainer.replay == "r3" else "R2 replay (trainer routes)"
            replay = _condition(label, t["rollout_routes"], t["replay_routes"], t["rollout_logp"], t["replay_logp"])
        ro = recipe.rollout
        stats = rollout_stats(rollouts)
        report = build_report(
            native, replay, guard=t["guard"],
            rollout={
                "engine": ro.engine, "device": ro.device, "dtype": ro.dtype, "overlap": ro.overlap, **stats,
                "seconds": seconds, "tokens_per_second": stats["generated_tokens"] / seconds,
                "num_moe_layers": len(spec.moe_layers), "top_k": spec.top_k, "num_experts": spec.num_experts,
            },
            run={
                "model": str(model_dir), "model_fingerprint": fingerprint, "replay": recipe.trainer.replay,
                "trainer_dtype": recipe.trainer.dtype, "trainer_device": recipe.trainer.device,
                "rollout_file": ROLLOUT_FILE, "recipe": to_dict(recipe),
                "tokens_per_second_note": "generated tokens / wall time of the generate loop (engine load excluded)",
            },
        )
        write_report(tmp, report, native, replay)
    log(table(report))
    log(report["verdict"])
    log(f"wrote {target}/ (report.json, report.md, report.png, {ROLLOUT_FILE})")
    return report
