"""The plugin's replay counters and log lines, through verl's own FSDP worker (CPU, gloo, tiny Qwen3-MoE).

What the end-to-end run reads off verl's metrics: ``actor/r3/replayed_rows`` (routed
(token, layer) rows), ``actor/r3/mismatched_rows`` (rows whose ids did not reach the
experts as given) and ``actor/r3/router_agreement``; and one log line per pass saying
that ``routed_experts`` reached the actor.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest

pytest.importorskip("verl", reason="verl 0.9.x is not installed (see trainer_bridge/verl/requirements-ci.txt)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import verl_harness as vh  # noqa: E402
from verl_harness import engine_process_group, model_dir, spec  # noqa: E402,F401  (module fixtures)
from trainer_bridge import RouteMisalignmentWarning, replay  # noqa: E402
from trainer_bridge.verl import plugin  # noqa: E402
from trainer_bridge.verl.counters import ExpertProbe  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

if not vh.engine_runs_on_cpu():
    pytest.skip("verl's FSDP engine was imported before the CPU platform was set", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _process_group(engine_process_group):
    yield


def routed_rows(rollouts, spec) -> int:
    """(token, MoE layer) rows SGLang-style rollouts route: every token but each sequence's last, every MoE layer."""
    return sum(r.num_tokens - 1 for r in rollouts) * len(spec.moe_layers)


def value(metric) -> float:
    """A metric as verl's trainer reduces it: a list over DP ranks of ``Metric``, or already a list of floats."""
    if isinstance(metric, list) and metric and isinstance(metric[0], Metric):
        return float(Metric.aggregate_dp(metric))
    if isinstance(metric, Metric):
        return float(metric.aggregate())
    return float(sum(metric) / len(metric))


def test_probe_sees_what_reached_the_experts(model_dir, spec):
    """The probe measures the experts' input, not the routes it was given: without replay the ids differ."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    rollouts = vh.random_rollouts(spec, seed=11)[:1]
    r = rollouts[0]
    tokens = torch.tensor([r.token_ids])
    routes = torch.full((1, r.num_tokens, len(spec.moe_layers), spec.top_k), -1, dtype=torch.int64)
    routes[0, :-1] = torch.from_numpy(r.routed_experts.ids.astype("int64"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteMisalignmentWarning)
        with replay(model, routes) as session:
            probe = ExpertProbe.attach(model, routes)
            model(input_ids=tokens)
            replayed = probe.finish(session, len(spec.moe_layers))
        session_free = ExpertProbe.attach(model, routes)
        model(input_ids=tokens)
        native = session_free.finish(session, len(spec.moe_layers))
    assert replayed.replayed == native.replayed == (r.num_tokens - 1) * len(spec.moe_layers)
    assert replayed.matched == replayed.replayed
    assert native.matched < native.replayed  # random routes are not the model's own choice


def test_old_logprob_pass_reports_counters_and_logs_the_arrival(model_dir, spec, caplog):
    worker = vh.make_worker(model_dir, "R3", micro_batch=len(vh.LENGTHS), gradient_checkpointing=False)
    rollouts = vh.random_rollouts(spec, seed=12)
    with caplog.at_level(logging.INFO, logger=plugin.__name__), warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteMisalignmentWarning)
        out = worker.infer_batch(vh.old_logprob_batch(vh.verl_fields(rollouts, spec)))
    metrics = tu.get(out, "metrics")
    assert value(metrics[plugin.REPLAYED_ROWS_METRIC]) == routed_rows(rollouts, spec)
    assert value(metrics[plugin.MISMATCHED_ROWS_METRIC]) == 0
    agreement = value(metrics[plugin.AGREEMENT_METRIC])
    assert 0.0 <= agreement < 0.9  # the trainer's own router disagrees with these random routes
    lines = [rec.getMessage() for rec in caplog.records if rec.name == plugin.__name__]
    assert len(lines) == 1
    assert "routed_experts reached the actor (old-logprob pass, 4 sequences, 1 micro-batch)" in lines[0]
    assert f"replayed {routed_rows(rollouts, spec)} (token, layer) rows, 100.00% reached the experts" in lines[0]


def test_update_pass_counters_reach_the_trainer_metrics(model_dir, spec, caplog):
    """verl's update path (train_mini_batch -> train_batch -> forward_backward_batch) keeps the counters,
    aggregated the way verl aggregates its own loss metrics; the trainer logs them as ``actor/r3/...``."""
    worker = vh.make_worker(model_dir, "R3", micro_batch=len(vh.LENGTHS))
    rollouts = vh.random_rollouts(spec, seed=13)
    fields = vh.verl_fields(rollouts, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteMisalignmentWarning)
        td = vh.old_logprob_batch(fields)
        old = no_padding_2_padding(tu.get(worker.infer_batch(td), "log_probs"), td)
        with caplog.at_level(logging.INFO, logger=plugin.__name__):
            metrics = tu.get(worker.train_mini_batch(vh.update_batch(fields, old, torch.ones_like(old))), "metrics")
    # Forward and activation-checkpoint recompute both replay, but each row is counted once.
    assert value(metrics[plugin.REPLAYED_ROWS_METRIC]) == routed_rows(rollouts, spec)
    assert value(metrics[plugin.MISMATCHED_ROWS_METRIC]) == 0
    assert [rec.getMessage() for rec in caplog.records if "update pass" in rec.getMessage()]


def test_disabled_mode_logs_the_arrival_and_adds_no_counters(model_dir, spec, caplog):
    worker = vh.make_worker(model_dir, "disabled", micro_batch=len(vh.LENGTHS), gradient_checkpointing=False)
    rollouts = vh.random_rollouts(spec, seed=14)
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        out = worker.infer_batch(vh.old_logprob_batch(vh.verl_fields(rollouts, spec)))
    assert plugin.REPLAYED_ROWS_METRIC not in tu.get(out, "metrics")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == plugin.__name__]
    assert len(lines) == 1 and "router_replay.mode=disabled: routing natively" in lines[0]


def test_agreement_is_nan_when_no_layer_had_enough_rows(model_dir, spec):
    """Two short sequences give fewer routed rows than the guard judges: the metric says so instead of inventing 1.0."""
    worker = vh.make_worker(model_dir, "R3", micro_batch=1, gradient_checkpointing=False)
    rollouts = vh.random_rollouts(spec, seed=15)[1:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteMisalignmentWarning)
        out = worker.infer_batch(vh.old_logprob_batch(vh.verl_fields(rollouts, spec)))
    metrics = tu.get(out, "metrics")
    assert value(metrics[plugin.REPLAYED_ROWS_METRIC]) == routed_rows(rollouts, spec)
    assert math.isnan(value(metrics[plugin.AGREEMENT_METRIC]))
