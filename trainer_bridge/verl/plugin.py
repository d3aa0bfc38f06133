"""R3 and R2 for verl's FSDP (transformers) engine, switched on from verl's own config.

verl replays routes only in its Megatron and VeOmni engines and treats
``router_replay.mode`` as ``disabled`` for FSDP (verl issue #5392). Importing this
module (verl does it for you through ``actor_rollout_ref.model.external_lib``)
wraps three methods of ``FSDPEngineWithLMHead``; verl's files are not touched:

* ``forward_backward_batch`` decides, before any forward, what this batch does:
  replay the batch's ``routed_experts`` (R3 always; R2 on the update passes) or
  record the trainer's own routes (R2 on the forward-only old-logprob pass), and
  validates the routes against the model (layer count, top_k, ids);
* ``prepare_model_inputs`` lays the micro-batch's routes out like the
  ``input_ids`` it just built (packed remove-padding row with its tail pad, sliced
  per rank under Ulysses SP with verl's own ``slice_input_tensor``, or
  right-padded rows) and opens trainer_bridge's :func:`~trainer_bridge.replay`
  (or :func:`~trainer_bridge.record`) on the module. The context stays open
  until the next micro-batch starts, so the backward of this micro-batch,
  activation-checkpoint recompute included, replays the same routes;
* ``prepare_model_outputs`` returns the R2 recording as ``routed_experts`` in
  verl's nested int16 form (Ulysses shards gathered as verl gathers log-probs),
  which verl's trainer carries into the update batch.

Every replaying ``forward_backward_batch`` adds its replay counters to verl's own
metrics (``actor/r3/...`` in the trainer's log, see :mod:`trainer_bridge.verl.counters`)
and logs one line saying that ``routed_experts`` reached the actor; with the mode
``disabled`` the line says the field arrived and was not replayed.

The mode is verl's own key, read per engine, so the reference model (its own
``fsdp_config``) keeps routing natively: ``actor_rollout_ref.actor.fsdp_config.router_replay.mode``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.utils.ulysses import slice_input_tensor
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import build_attention_mask_from_nested

from rollout.moe_spec import MoESpec
from trainer_bridge.replay import Recording, check_route_tensor, record, replay
from trainer_bridge.verl import sglang_compat
from trainer_bridge.verl.counters import ExpertProbe, ReplayTally
from trainer_bridge.verl.layout import (
    ROLLOUT_ROUTES_KEY,
    ROUTES_FIELD,
    packed_model_routes,
    padded_model_routes,
    routes_from_nested,
    routes_from_padded,
    to_verl_layers,
)

MODE_KEY = "actor_rollout_ref.actor.fsdp_config.router_replay.mode"
SP_KEY = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
REPLAY_MODES = ("R2", "R3")
MODES = ("disabled", *REPLAY_MODES)
# Engines this plugin replays in. VeOmni's engine subclasses FSDPEngineWithLMHead but replays on its own.
FSDP_STRATEGIES = ("fsdp", "fsdp2")
GUARD = "warn"  # trainer_bridge's misalignment guard: warn when replayed routes look unrelated to the tokens
REPLAY, RECORD = "replay", "record"
# verl's metric names for the replay counters; the trainer logs them as ``actor/<name>`` for update passes.
REPLAYED_ROWS_METRIC = "r3/replayed_rows"
MISMATCHED_ROWS_METRIC = "r3/mismatched_rows"
AGREEMENT_METRIC = "r3/router_agreement"
LOG_PREFIX = "R3 plugin"
UPDATE_PASS, OLD_LOGPROB_PASS = "update pass", "old-logprob pass"

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)  # verl configures the root handler at WARNING; these lines are the run's evidence


def flat_routes(batch: TensorDict, spec: MoESpec) -> torch.Tensor:
    """The batch's routes as int64 ``[total_tokens, L, K]`` rows aligned with ``input_ids.values()``.

    verl's trainer hands the engine the nested form (``left_right_2_no_padding``); a batch
    that kept the padded field is read through its ``attention_mask`` instead.
    """
    routes, input_ids = batch[ROUTES_FIELD], batch["input_ids"]
    if routes.is_nested:
        return routes_from_nested(routes, input_ids, spec)
    mask = batch["attention_mask"]
    return routes_from_padded(routes, mask, spec)[mask.bool()]


def _uses_remove_padding(micro_batch: TensorDict) -> bool:
    return bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))


@dataclass
class BatchScope:
    """Replay or record state of one ``forward_backward_batch`` call."""

    action: str
    spec: MoESpec
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    recording: Recording | None = None
    tally: ReplayTally = field(default_factory=ReplayTally)

    def start_micro_batch(
        self, engine: FSDPEngineWithLMHead, micro_batch: TensorDict, model_input_ids: torch.Tensor, pad_size: int
    ) -> None:
        """Close the previous micro-batch's context (its backward is done) and open this one's.

        ``pad_size`` is what verl appended to the packed sequence (``pad_to_length`` and the
        Ulysses alignment); under Ulysses SP the routes are then sliced exactly like the tokens.
        """
        self.stack.close()
        if self.action == RECORD:
            self.recording = self.stack.enter_context(record(engine.module))
            return
        flat = flat_routes(micro_batch, self.spec).to(model_input_ids.device)
        if _uses_remove_padding(micro_batch):
            routes = packed_model_routes(flat, flat.shape[0] + pad_size)
            if engine.use_ulysses_sp:
                routes = slice_input_tensor(routes, dim=1, padding=False)
        else:
            routes = padded_model_routes(flat, micro_batch["input_ids"], model_input_ids.shape[1])
        if routes.shape[:2] != model_input_ids.shape[:2]:
            raise ValueError(
                f"routes laid out as {list(routes.shape[:2])} tokens but the model input is {list(model_input_ids.shape[:2])}: "
                f"this model shards tokens after the embedding (vision-language), which the plugin does not support "
                f"with {SP_KEY} > 1"
            )
        session = self.stack.enter_context(replay(engine.module, routes, guard=GUARD))
        probe = ExpertProbe.attach(engine.module, routes)
        # Runs when the next micro-batch starts (or the batch ends): after this micro-batch's backward.
        self.stack.callback(lambda: self.tally.counts.append(probe.finish(session, len(self.spec.moe_layers))))

    def recorded(self, engine: FSDPEngineWithLMHead, micro_batch: TensorDict, pad_size: int) -> torch.Tensor:
        """This micro-batch's recorded routes in verl's form: nested int16 ``[batch, seq, num_hidden_layers, K]``.

        Remove-padding: verl's own gather (Ulysses shards) and pad strip, as for its log-probs.
        """
        routes = self.recording.routes
        input_ids = micro_batch["input_ids"]
        if _uses_remove_padding(micro_batch):
            flat = engine._gather_and_unpad_packed(routes[0], pad_size)
        else:
            mask = build_attention_mask_from_nested(input_ids, max_seq_len=routes.shape[1])
            flat = routes[mask.bool()]
        return torch.nested.nested_tensor_from_jagged(
            to_verl_layers(flat, self.spec), offsets=input_ids.offsets().to(flat.device)
        )

    def close(self) -> None:
        self.stack.close()


def replay_mode(engine: FSDPEngineWithLMHead) -> str:
    """verl's ``router_replay.mode``: a config dataclass from YAML with ``_target_``, a plain dict from a bare
    ``+...router_replay.mode=R3`` override (which skips the dataclass's own validation, so it is checked here)."""
    mode = engine.engine_config.router_replay.get("mode", "disabled")
    if mode not in MODES:
        raise ValueError(f"{MODE_KEY}={mode!r} is not one of {list(MODES)}")
    return mode


def _pass_name(forward_only: bool) -> str:
    return OLD_LOGPROB_PASS if forward_only else UPDATE_PASS


def batch_action(engine: FSDPEngineWithLMHead, data: TensorDict, forward_only: bool) -> BatchScope | None:
    """What this batch does (``None``: route natively), with every check that must precede the first forward."""
    mode = replay_mode(engine)
    if engine.engine_config.strategy not in FSDP_STRATEGIES:
        return None
    if mode not in REPLAY_MODES:
        if ROUTES_FIELD in data.keys():
            logger.info(native_line(_pass_name(forward_only), data.batch_size[0], mode))
        return None
    # verl's own per-call switch (set False for the reference pass by workers that honour router replay).
    if tu.get_non_tensor_data(data=data, key="enable_routing_replay", default=True) is False:
        return None
    spec = MoESpec.from_config(engine.model_config.hf_config)
    if ROUTES_FIELD not in data.keys():
        if mode == "R3":
            raise ValueError(
                f"{MODE_KEY}=R3 replays rollout routes, but the batch has no {ROUTES_FIELD!r} field: "
                f"set {ROLLOUT_ROUTES_KEY}=True so the rollout engine returns them"
            )
        if not forward_only:
            raise ValueError(
                f"{MODE_KEY}=R2 replays the routes recorded by the old-logprob pass, but this update batch has no "
                f"{ROUTES_FIELD!r}: keep algorithm.rollout_correction.bypass_mode=False so compute_log_prob runs first"
            )
        return BatchScope(RECORD, spec)
    check_route_tensor(flat_routes(data, spec), spec)
    return BatchScope(REPLAY, spec)


def replay_metrics(tally: ReplayTally) -> dict[str, Metric]:
    """The counters as verl ``Metric`` s, one value per call on every rank (verl aggregates them across DP).

    Row counts are sums; the agreement is NaN when no layer had enough routed rows to judge.
    """
    matched, agreement = tally.matched, tally.agreement
    values = {
        REPLAYED_ROWS_METRIC: (AggregationType.SUM, float(tally.replayed)),
        MISMATCHED_ROWS_METRIC: (AggregationType.SUM, math.nan if matched is None else float(tally.replayed - matched)),
        AGREEMENT_METRIC: (AggregationType.MEAN, math.nan if agreement is None else agreement),
    }
    return {name: Metric(aggregation, value) for name, (aggregation, value) in values.items()}


def replay_line(pass_name: str, sequences: int, tally: ReplayTally) -> str:
    """The log line of a replaying pass (``bench/verl_e2e/report.py`` counts them)."""
    match = "not measurable on this model" if tally.match is None else f"{tally.match:.2%} reached the experts as given"
    agreement = "n/a" if tally.agreement is None else f"{tally.agreement:.2%}"
    batches = len(tally.counts)
    return (
        f"{LOG_PREFIX}: {ROUTES_FIELD} reached the actor ({pass_name}, {sequences} sequences, "
        f"{batches} micro-batch{'es' if batches != 1 else ''}): replayed {tally.replayed} (token, layer) rows, {match}; "
        f"trainer's own router agreed with them on {agreement} of expert slots"
    )


def native_line(pass_name: str, sequences: int, mode: str) -> str:
    """The log line of a pass that got routes and does not replay them."""
    return f"{LOG_PREFIX}: {ROUTES_FIELD} reached the actor ({pass_name}, {sequences} sequences); {MODE_KEY}={mode}: routing natively"


def _wrap_forward_backward_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only: bool = False) -> Any:
        scope = batch_action(self, data, forward_only)
        if scope is None:
            return original(self, data, loss_function, forward_only=forward_only)
        self._r3_scope = scope
        try:
            output = original(self, data, loss_function, forward_only=forward_only)
        finally:
            self._r3_scope = None
            scope.close()
        if scope.action == REPLAY:
            logger.info(replay_line(_pass_name(forward_only), data.batch_size[0], scope.tally))
            if isinstance(output, dict) and isinstance(output.get("metrics"), dict):
                output["metrics"].update(replay_metrics(scope.tally))
        return output

    return forward_backward_batch


def _wrap_prepare_model_inputs(original: Callable) -> Callable:
    @functools.wraps(original)
    def prepare_model_inputs(self, micro_batch: TensorDict) -> Any:
        model_inputs, output_args = original(self, micro_batch)
        scope: BatchScope | None = getattr(self, "_r3_scope", None)
        if scope is not None:
            scope.start_micro_batch(self, micro_batch, model_inputs["input_ids"], int(output_args.get("pad_size", 0)))
        return model_inputs, output_args

    return prepare_model_inputs


def _wrap_prepare_model_outputs(original: Callable) -> Callable:
    @functools.wraps(original)
    def prepare_model_outputs(self, output: Any, output_args: dict, micro_batch: TensorDict, logits_processor_func: Any) -> Any:
        model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        scope: BatchScope | None = getattr(self, "_r3_scope", None)
        if scope is not None and scope.action == RECORD:
            model_output[ROUTES_FIELD] = scope.recorded(self, micro_batch, int(output_args.get("pad_size", 0)))
        return model_output

    return prepare_model_outputs


_WRAPPERS = {
    "forward_backward_batch": _wrap_forward_backward_batch,
    "prepare_model_inputs": _wrap_prepare_model_inputs,
    "prepare_model_outputs": _wrap_prepare_model_outputs,
}
_INSTALLED = "_r3_plugin_installed"


def install(engine_cls: type = FSDPEngineWithLMHead) -> None:
    """Wrap the engine's methods once; importing this module calls it."""
    if engine_cls.__dict__.get(_INSTALLED):
        return
    for name, wrap in _WRAPPERS.items():
        setattr(engine_cls, name, wrap(getattr(engine_cls, name)))
    setattr(engine_cls, _INSTALLED, True)


install()
sglang_compat.install()
