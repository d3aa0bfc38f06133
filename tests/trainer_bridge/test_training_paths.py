"""Activation checkpointing and micro-batching must not change what is replayed, so gradients stay equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replay_helpers import random_routes
from rollout.moe_spec import MoESpec
from trainer_bridge import replay
from trainer_bridge.routers import in_checkpoint_recompute, moe_blocks_of

BATCH, SEQ = 4, 8


def _summed_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


def _grads(model: torch.nn.Module, input_ids: torch.Tensor, routes: torch.Tensor, micro_batches: int) -> dict[str, torch.Tensor]:
    """One context per micro-batch holding its forward and backward: its own routes, recompute included."""
    model.zero_grad()
    for ids, r in zip(input_ids.chunk(micro_batches), routes.chunk(micro_batches)):
        with replay(model, r, guard="off"):
            _summed_loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def model_and_batch(load_tiny):
    model = load_tiny("tiny-qwen3-moe").train()
    spec = MoESpec.from_config(model.config)
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    # routes unrelated to the model's own choice: a recompute that routed natively would change the gradients
    routes = random_routes((BATCH, SEQ), len(spec.moe_layers), spec.top_k, spec.num_experts, seed=7)
    routes[:, -1] = -1
    return model, ids, routes


def _count_recomputes(model: torch.nn.Module) -> list[int]:
    """Counts MoE block forwards that run inside backward, i.e. checkpoint recomputes."""
    count = [0]

    def hook(module, args):  # a pre-hook: non-reentrant recompute stops early, before forward hooks would run
        count[0] += in_checkpoint_recompute()

    for block in moe_blocks_of(model)[1]:
        block.module.register_forward_pre_hook(hook)
    return count


@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant"])
def test_gradients_equal_across_checkpointing_and_micro_batches(model_and_batch, checkpointing):
    model, ids, routes = model_and_batch
    reference = _grads(model, ids, routes, micro_batches=1)
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    recomputes = _count_recomputes(model)
    for micro_batches in (2, 4) if checkpointing == "off" else (1, 4):
        got = _grads(model, ids, routes, micro_batches)
        assert got.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=f"{name}, {micro_batches} micro-batches")
    assert any("gate.weight" in n and g.abs().max() > 0 for n, g in got.items())
    assert (recomputes[0] > 0) == (checkpointing != "off")


def test_recompute_without_replay_would_differ(model_and_batch):
    """Makes the test above meaningful: native routing gives other gradients than the replayed routes."""
    model, ids, routes = model_and_batch
    replayed = _grads(model, ids, routes, micro_batches=1)
    native = _grads(model, ids, torch.full_like(routes, -1), micro_batches=1)
    assert any(not torch.allclose(replayed[n], native[n], rtol=1e-3, atol=1e-5) for n in replayed)
