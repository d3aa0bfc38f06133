"""R3 / R2 through verl's own FSDP engine on CPU (tiny Qwen3-MoE, single-process gloo).

verl code that runs here, unmodified: ``DataProto.from_dict`` / ``to_tensordict``,
``left_right_2_no_padding`` (remove-padding of ``routed_experts`` into a nested
tensor), ``TrainingWorker`` (``reset``, ``infer_batch``, ``train_mini_batch``,
``train_batch``), ``EngineRegistry.new``, ``FSDPEngine.initialize`` (FSDP2
``fully_shard``, AdamW, LR scheduler, checkpoint manager),
``FSDPEngine.forward_backward_batch`` with ``prepare_micro_batches``,
``FSDPEngineWithLMHead.prepare_model_inputs`` / ``forward_step`` /
``prepare_model_outputs``, ``postprocess_batch_func``, ``no_padding_2_padding``,
``ppo_loss`` and the optimizer step. The plugin is loaded by verl itself through
``HFModelConfig.external_lib``.
"""

from __future__ import annotations

import json
import warnings

import pytest

from verl_stack import require

require("verl_harness")

import torch  # noqa: E402

import verl_harness as vh  # noqa: E402
from verl_harness import engine_process_group, model_dir, spec  # noqa: E402,F401  (module fixtures)
from rollout.moe_spec import MoESpec  # noqa: E402
from trainer_bridge import RouteMisalignmentWarning  # noqa: E402
from trainer_bridge.verl import rollouts_to_verl_fields  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

if not vh.engine_runs_on_cpu():
    pytest.skip("verl's FSDP engine was imported before the CPU platform was set", allow_module_level=True)

@pytest.fixture(scope="module", autouse=True)
def _process_group(engine_process_group):
    yield



def run_old_logprob(worker, fields):
    td = vh.old_logprob_batch(fields)
    probe = vh.RouteProbe.attach(worker.engine.module)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = worker.infer_batch(td)
    finally:
        probe.detach()
    return td, out, probe, caught


@pytest.fixture(scope="module")
def r3_worker(model_dir):
    return vh.make_worker(model_dir, "R3", micro_batch=len(vh.LENGTHS))


def test_r3_old_logprob_pass_replays_and_matches_direct_replay(r3_worker, model_dir, spec):
    rollouts = vh.random_rollouts(spec)
    td, out, probe, caught = run_old_logprob(r3_worker, vh.verl_fields(rollouts, spec))
    assert td["routed_experts"].is_nested  # verl's remove-padding turned the padded field into a jagged one

    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=1)
    # The guard runs inside verl's forward and sees that these random routes are not the model's.
    assert any(issubclass(w.category, RouteMisalignmentWarning) for w in caught)

    log_probs = tu.get(out, "log_probs")
    reference = vh.direct_replay_logprobs(model_dir, rollouts)
    for i, (seq, ref) in enumerate(zip(log_probs.unbind(), reference)):
        torch.testing.assert_close(seq[:-1], ref, rtol=1e-5, atol=1e-5, msg=f"sequence {i}")


def test_r3_reads_a_padded_field_through_the_attention_mask(r3_worker, spec):
    """A batch whose routed_experts kept verl's padded layout replays the same as the nested one."""
    rollouts = vh.random_rollouts(spec, seed=6)
    fields = vh.verl_fields(rollouts, spec)
    _, nested_out, _, _ = run_old_logprob(r3_worker, fields)
    td = vh.old_logprob_batch(fields)
    td["routed_experts"] = fields["routed_experts"]  # padded [batch, seq, layers, top_k] next to nested input_ids
    probe = vh.RouteProbe.attach(r3_worker.engine.module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RouteMisalignmentWarning)
            padded_out = r3_worker.infer_batch(td)
    finally:
        probe.detach()
    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=1)
    torch.testing.assert_close(tu.get(padded_out, "log_probs").values(), tu.get(nested_out, "log_probs").values())


def test_r3_update_pass_replays_the_same_routes_as_the_old_logprob_pass(r3_worker, spec):
    """verl's PPO update (ppo_loss, backward with activation-checkpoint recompute, optimizer step) replays too:
    with identical routes the new and old log-probs are equal, so PPO's KL estimate is exactly zero."""
    rollouts = vh.random_rollouts(spec, seed=1)
    fields = vh.verl_fields(rollouts, spec)
    td, out, _, _ = run_old_logprob(r3_worker, fields)
    old = no_padding_2_padding(tu.get(out, "log_probs"), td)
    advantages = torch.randn(old.shape, generator=torch.Generator().manual_seed(0))

    probe = vh.RouteProbe.attach(r3_worker.engine.module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RouteMisalignmentWarning)
            metrics = tu.get(r3_worker.train_mini_batch(vh.update_batch(fields, old, advantages)), "metrics")
    finally:
        probe.detach()

    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=2)  # forward + gradient-checkpoint recompute
    assert abs(float(metrics["actor/ppo_kl"][0])) < 1e-6
    assert float(metrics["actor/pg_clipfrac"][0]) == 0.0


def test_r3_without_remove_padding_uses_right_padded_rows(model_dir, spec):
    worker = vh.make_worker(model_dir, "R3", micro_batch=2, remove_padding=False, gradient_checkpointing=False)
    rollouts = vh.random_rollouts(spec, seed=2)
    _, out, probe, _ = run_old_logprob(worker, vh.verl_fields(rollouts, spec))
    reference = vh.direct_replay_logprobs(model_dir, rollouts)
    for i, (seq, ref) in enumerate(zip(tu.get(out, "log_probs").unbind(), reference)):
        torch.testing.assert_close(seq[:-1], ref, rtol=1e-5, atol=1e-5, msg=f"sequence {i}")
    # Two micro-batches of two right-padded rows each: every row of every micro-batch replayed its own routes.
    for layer in range(len(spec.moe_layers)):
        assert len(probe.ids[layer]) == 2
        for m, seen in enumerate(probe.ids[layer]):
            pair = rollouts[2 * m : 2 * m + 2]
            width = max(r.num_tokens for r in pair)
            seen = seen.reshape(2, width, spec.top_k)
            for j, r in enumerate(pair):
                given = torch.from_numpy(r.routed_experts.ids[:, layer].astype("int64"))
                assert torch.equal(seen[j, : r.num_tokens - 1], given)


def test_mode_from_a_bare_command_line_override(model_dir, spec):
    """``+actor_rollout_ref.actor.fsdp_config.router_replay.mode=R3`` leaves a dict, not verl's dataclass."""
    worker = vh.make_worker(model_dir, {"mode": "R3"}, micro_batch=len(vh.LENGTHS), gradient_checkpointing=False)
    rollouts = vh.random_rollouts(spec, seed=7)
    _, _, probe, _ = run_old_logprob(worker, vh.verl_fields(rollouts, spec))
    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=1)


def test_r2_records_in_old_logprob_pass_and_replays_in_update(model_dir, spec):
    worker = vh.make_worker(model_dir, "R2", micro_batch=2)
    fields = vh.verl_fields(vh.random_rollouts(spec, seed=3), spec)
    del fields["routed_experts"]  # R2 needs no rollout routes
    td, out, probe, _ = run_old_logprob(worker, fields)
    recorded = tu.get(out, "routed_experts")
    assert recorded.is_nested and recorded.dtype == torch.int16
    assert recorded.shape[0] == len(vh.LENGTHS) and recorded.values().shape[1:] == (spec.num_hidden_layers, spec.top_k)
    native = torch.cat([torch.cat(probe.ids[layer]) for layer in range(len(spec.moe_layers))], dim=1)
    native = native.reshape(-1, len(spec.moe_layers), spec.top_k)
    assert torch.equal(recorded.values().long().sort(-1).values, native.sort(-1).values)

    # Move the routers so the trainer's native choice changes; R2 must still use the recorded routes.
    with torch.no_grad():
        for name, param in worker.engine.module.named_parameters():
            if name.endswith("mlp.gate.weight"):
                local = param.to_local() if hasattr(param, "to_local") else param
                local.add_(torch.randn(local.shape, generator=torch.Generator().manual_seed(4)))
    old = no_padding_2_padding(tu.get(out, "log_probs"), td)
    update = vh.update_batch(fields, old, torch.ones_like(old))
    update["routed_experts"] = recorded  # as verl's trainer carries it: the nested field from compute_log_prob
    probe = vh.RouteProbe.attach(worker.engine.module)
    try:
        worker.train_mini_batch(update)
    finally:
        probe.detach()
    replayed = torch.cat([torch.cat(probe.ids[layer][::2]) for layer in range(len(spec.moe_layers))], dim=1)
    replayed = replayed.reshape(-1, len(spec.moe_layers), spec.top_k)
    final = recorded.offsets()[1:] - 1
    keep = torch.ones(replayed.shape[0], dtype=torch.bool)
    keep[final] = False  # the final token of each sequence routes natively by design
    assert torch.equal(replayed[keep], recorded.values().long()[keep])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f.update(routed_experts=f["routed_experts"][:, :, :3]), "num_hidden_layers=4"),
        (lambda f: f.update(routed_experts=f["routed_experts"][..., :1]), "top_k=1"),
        (lambda f: f.pop("routed_experts"), "actor_rollout_ref.rollout.enable_rollout_routing_replay"),
        (lambda f: f["routed_experts"].__setitem__((0, vh.PROMPT_WIDTH, 0, 0), 9), "num_experts=8"),
    ],
    ids=["layer-count", "top_k", "missing", "id-out-of-range"],
)
def test_bad_routes_fail_before_the_first_forward(r3_worker, spec, corrupt, message):
    fields = vh.verl_fields(vh.random_rollouts(spec, seed=5), spec)
    corrupt(fields)
    td = vh.old_logprob_batch(fields)
    probe = vh.RouteProbe.attach(r3_worker.engine.module)
    try:
        with pytest.raises(ValueError, match=message):
            r3_worker.infer_batch(td)
    finally:
        probe.detach()
    assert probe.calls == 0


def test_real_sglang_routes_replay_exactly_through_verl(sglang_fixture):
    """SGLang 0.5.17's own routes for its own checkpoint: every routed row replays, and the guard stays quiet."""
    from rollout.sglang.protocol import decode_reply

    spec = MoESpec.from_pretrained(sglang_fixture)
    cases = json.loads((sglang_fixture / "replies.json").read_text())["cases"][:8]
    rollouts = [decode_reply(c["reply"], c["request"]["input_ids"], spec) for c in cases]
    worker = vh.make_worker(str(sglang_fixture.resolve()), "R3", micro_batch=len(rollouts), gradient_checkpointing=False)
    fields = rollouts_to_verl_fields(rollouts, spec)
    _, _, probe, caught = run_old_logprob(worker, fields)

    ids, routed = vh.expected_packed(rollouts)
    vh.check_replayed(probe, ids, routed, calls_per_layer=1)
    assert not [w for w in caught if issubclass(w.category, RouteMisalignmentWarning)]
    # Replay was needed: on some rows the trainer's own router disagrees with SGLang.
    differ = 0
    for layer in range(len(spec.moe_layers)):
        native = probe.logits[layer][0].topk(spec.top_k, dim=-1).indices.sort(-1).values
        differ += int((native[routed] != ids[routed, layer].sort(-1).values).any(-1).sum())
    assert differ > 0
