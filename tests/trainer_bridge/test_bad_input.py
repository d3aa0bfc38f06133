"""Bad routes fail with a clear ValueError before any forward runs, and leave the model unpatched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout.routed_experts import RoutedExperts
from trainer_bridge import record, replay
from trainer_bridge.routers import moe_blocks_of

BATCH, SEQ = 2, 6


@pytest.fixture(scope="module")
def model(load_tiny):
    return load_tiny("tiny-qwen3-moe")


@pytest.fixture
def forwards(model):
    """How many forwards reached the embedding; must stay 0 when input is rejected."""
    count = [0]
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()
    assert all("forward" not in vars(b.module) for b in moe_blocks_of(model)[1])


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _good() -> torch.Tensor:
    return torch.tensor([0, 1]).expand(BATCH, SEQ, 4, 2).clone()


@pytest.mark.parametrize(
    "routes, message",
    [
        (_good()[:, :, :3], "routes have 3 MoE layers but the model has 4"),
        (torch.zeros(BATCH, SEQ, 4, 3, dtype=torch.long) + torch.tensor([0, 1, 2]), "top_k=3"),
        (_good() + 7, "expert id 8 >= num_experts=8"),
        (_good().float(), "integer tensor"),
        (_good() - 2, "negative"),
        (torch.cat([_good()[..., :1], torch.full((BATCH, SEQ, 4, 1), -1)], -1), "partly -1"),
        (torch.zeros(BATCH, SEQ, 4, 2, dtype=torch.long), "repeat an expert id"),
        (torch.zeros(4, 2, dtype=torch.long), "shaped like input_ids"),
        # routes recorded on a model with another layer count
        (RoutedExperts(np.tile([0, 1], (SEQ - 1, 6, 1)), 8), "MoE layers \\[0, 1, 2, 3, 4, 5\\]"),
        (RoutedExperts(np.tile([0, 1], (SEQ - 1, 4, 1)), 16), "num_experts=16"),
        ([], "non-empty list"),
    ],
)
def test_bad_routes_fail_on_entry(model, forwards, routes, message):
    with pytest.raises(ValueError, match=message):
        with replay(model, routes):
            model(input_ids=_ids())
    assert forwards[0] == 0


@pytest.mark.parametrize(
    "routes, message",
    [
        (_good()[:, :-1], "routes cover tokens of shape \\[2, 5\\] but input_ids have shape \\[2, 6\\]"),
        (_good().reshape(1, BATCH * SEQ, 4, 2), "input_ids have shape"),
        ([RoutedExperts(np.tile([0, 1], (SEQ - 1, 4, 1)), 8)], "1 RoutedExperts need input_ids of shape \\[1, seq\\]"),
        ([RoutedExperts(np.tile([0, 1], (SEQ + 1, 4, 1)), 8)] * BATCH, "cover positions \\[0, 7\\) but the row has 6"),
    ],
)
def test_routes_not_matching_the_tokens_fail_before_the_forward(model, forwards, routes, message):
    with replay(model, routes):
        with pytest.raises(ValueError, match=message):
            model(input_ids=_ids())
    assert forwards[0] == 0


def test_nesting_and_bad_options_are_refused(model, forwards):
    with replay(model, _good()):
        with pytest.raises(ValueError, match="already under replay or record"):
            with record(model):
                pass
    with pytest.raises(ValueError, match="guard must be one of"):
        with replay(model, _good(), guard="loud"):
            pass
    with record(model) as rec:
        with pytest.raises(ValueError, match="nothing recorded"):
            rec.routes
    assert forwards[0] == 0


def test_unpatchable_models_get_a_clear_error(load_tiny):
    model = load_tiny("tiny-mixtral")
    del model.model.layers[2].mlp.gate  # a MoE block whose router this code cannot find
    with pytest.raises(ValueError, match=r"moe_layers \(0, 1, 2, 3\) in config.json but \(0, 1, 3\) in the model; MoE-like modules: \[.*MixtralSparseMoeBlock"):
        with replay(model, torch.full((1, 4, 4, 2), -1)):
            pass

    model = load_tiny("tiny-mixtral")
    router = model.model.layers[1].mlp.gate
    router.forward = lambda h: (lambda logits: (logits, logits.softmax(-1)[:, :2], logits.argsort(-1, descending=True)[:, :2]))(
        torch.nn.functional.linear(h, router.weight)
    )  # selects without top-k: refused from its code, before any forward
    with pytest.raises(ValueError, match="selection is not one top-k: model.layers.1.mlp .*MixtralTopKRouter.forward"):
        with replay(model, torch.full((1, 4, 4, 2), -1)):
            pass

    model = load_tiny("tiny-mixtral")
    router = model.model.layers[1].mlp.gate
    router.forward = lambda h: (lambda logits: (logits, logits.softmax(-1)[:, :2], logits.topk(3).indices[:, :2]))(
        torch.nn.functional.linear(h, router.weight)
    )  # a top-k, but not of top_k experts: only the forward can tell, and it fails there
    with pytest.raises(ValueError, match="model.layers.1.mlp .*made no top-2 selection"):
        with replay(model, torch.full((1, 4, 4, 2), -1)):
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
