"""Drive verl's own FSDP training worker on CPU, the way verl's PPO trainer drives it.

Nothing here re-implements verl: the worker is verl's ``TrainingWorker`` (it
builds ``FSDPEngineWithLMHead`` through verl's ``EngineRegistry``), batches go
through ``DataProto`` -> ``to_tensordict`` -> ``left_right_2_no_padding`` exactly as
``RayPPOTrainer._compute_old_log_prob`` / ``_update_actor`` send them, and the
update pass uses verl's ``ppo_loss``. The two CPU-specific pieces are verl
extension points, set in this folder's ``conftest.py``: a CPU platform
(``set_platform``) and ``VERL_ENGINE_DEVICE`` to select the engine registered for CUDA.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any, Iterator

import pytest
import torch

from hydra import compose, initialize_config_module
from verl import DataProto
from verl.trainer.config import CheckpointConfig
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import (
    EngineRouterReplayConfig,
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
    TrainingWorkerConfig,
)
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine_workers import TrainingWorker
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding

from rollout.moe_spec import MoESpec
from rollout.presets import init_model
from rollout.routed_experts import RoutedExperts
from rollout.types import FINISH_LENGTH, Rollout
from trainer_bridge.verl import rollouts_to_verl_fields

PLUGIN = "trainer_bridge.verl.plugin"

# Test batch: (prompt, response) lengths: uneven on both sides so left and right padding both occur.
LENGTHS = [(12, 10), (5, 4), (8, 8), (2, 10)]
PROMPT_WIDTH, RESPONSE_WIDTH = 13, 11
FP32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


def engine_runs_on_cpu() -> bool:
    return transformer_impl.device_name == "cpu"


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Single-process gloo group, as verl's worker would find under Ray; the environment is restored after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Module fixtures the engine tests share: ``from verl_harness import engine_process_group, model_dir, spec``.
@pytest.fixture(scope="module")
def engine_process_group():
    """A gloo world of one for the module's FSDP engines (verl's engine needs torch.distributed)."""
    if torch.distributed.is_initialized():
        pytest.skip("another test left a torch.distributed process group open")
    with process_group():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("verl") / "tiny-qwen3-moe"
    init_model("tiny-qwen3-moe", path, seed=0, dtype="float32")
    return str(path)


@pytest.fixture(scope="module")
def spec(model_dir) -> MoESpec:
    return MoESpec.from_pretrained(model_dir)


@cache
def ppo_actor_config() -> Any:
    """verl's own actor config (``ppo_trainer.yaml``), for ``ppo_loss``."""
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def make_worker(
    model_dir: str,
    mode: str | dict,
    *,
    micro_batch: int,
    remove_padding: bool = True,
    gradient_checkpointing: bool = True,
    ulysses: int = 1,
    mixed_precision: dict[str, str] = FP32,
) -> TrainingWorker:
    """verl's training worker on the FSDP engine (fp32 end to end unless told), with the plugin loaded through external_lib.

    ``mode`` as a dict is what a bare ``+...fsdp_config.router_replay.mode=R3`` command-line override yields.
    """
    model = HFModelConfig(
        path=model_dir,
        load_tokenizer=False,
        external_lib=PLUGIN,
        use_remove_padding=remove_padding,
        enable_gradient_checkpointing=gradient_checkpointing,
        override_config={"attn_implementation": "sdpa"},
    )
    engine = FSDPEngineConfig(
        strategy="fsdp2",
        use_torch_compile=False,
        mixed_precision=mixed_precision,
        use_dynamic_bsz=False,
        infer_micro_batch_size_per_gpu=micro_batch,
        micro_batch_size_per_gpu=micro_batch,
        ulysses_sequence_parallel_size=ulysses,
        router_replay=EngineRouterReplayConfig(mode=mode) if isinstance(mode, str) else mode,
    )
    worker = TrainingWorker(
        TrainingWorkerConfig(
            model_type="language_model",
            model_config=model,
            engine_config=engine,
            optimizer_config=FSDPOptimizerConfig(lr=1e-3),
            checkpoint_config=CheckpointConfig(),
        )
    )
    worker.reset()
    worker.set_loss_fn(partial(ppo_loss, config=ppo_actor_config()))
    return worker


def old_logprob_batch(fields: dict[str, torch.Tensor]) -> Any:
    """``RayPPOTrainer._compute_old_log_prob``: DataProto -> TensorDict -> remove padding -> meta."""
    data = DataProto.from_dict(tensors=dict(fields), meta_info={"temperature": 1.0})
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(
        td, calculate_entropy=False, compute_loss=False, global_token_num=fields["attention_mask"].sum(-1).tolist()
    )
    return td


def update_batch(fields: dict[str, torch.Tensor], old_log_probs: torch.Tensor, advantages: torch.Tensor) -> Any:
    """``RayPPOTrainer._update_actor``: one mini-batch of the whole batch, one epoch, no shuffle."""
    tensors = dict(fields, old_log_probs=old_log_probs, advantages=advantages)
    data = DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0})
    td = left_right_2_no_padding(data.to_tensordict())
    size = fields["input_ids"].shape[0]
    tu.assign_non_tensor(
        td,
        calculate_entropy=False,
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=size,
        mini_batch_size=size,
        epochs=1,
        seed=0,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
    )
    return td



@dataclass
class RouteProbe:
    """Per MoE layer, every call's router logits and the ids that reached the experts (forward and recompute)."""

    logits: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    ids: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, module: torch.nn.Module) -> "RouteProbe":
        probe = cls()
        for name, sub in module.named_modules():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] == "mlp" and parts[-1] in ("gate", "experts"):
                layer = int(parts[parts.index("layers") + 1])
                if parts[-1] == "gate":
                    probe.handles.append(sub.register_forward_hook(partial(probe._on_gate, layer)))
                else:
                    probe.handles.append(sub.register_forward_pre_hook(partial(probe._on_experts, layer)))
        return probe

    def _on_gate(self, layer: int, module: Any, args: Any, output: Any) -> None:
        self.logits[layer].append(output[0].detach().clone())

    def _on_experts(self, layer: int, module: Any, args: Any) -> None:
        self.ids[layer].append(args[1].detach().clone())

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.ids.values())


def direct_replay_logprobs(model_dir: str, rollouts: list[Rollout], device: str = "cpu") -> list[torch.Tensor]:
    """trainer_bridge on the plain transformers model (fp32), one unpadded sequence at a time: the reference log-probs."""
    import warnings

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from trainer_bridge import RouteMisalignmentWarning, replay

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    out = []
    with torch.no_grad():
        for r in rollouts:
            tokens = torch.tensor([r.token_ids], device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RouteMisalignmentWarning)
                with replay(model, r.routed_experts):
                    logits = model(input_ids=tokens).logits[0]
            out.append(F.log_softmax(logits[:-1].float(), -1).gather(-1, tokens[0, 1:, None])[:, 0].cpu())
    return out


def random_rollouts(spec: MoESpec, seed: int = 0, vocab_size: int = 512) -> list[Rollout]:
    """Routes unrelated to the model's choice (so replay is visible), laid out like SGLang's: rows [0, n-1)."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for prompt_len, response_len in LENGTHS:
        n = prompt_len + response_len
        tokens = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        ids = torch.rand((n - 1) * len(spec.moe_layers), spec.num_experts, generator=g).argsort(-1)[:, : spec.top_k]
        routes = RoutedExperts(ids.reshape(n - 1, len(spec.moe_layers), spec.top_k).numpy(), spec.num_experts, spec.moe_layers)
        rollouts.append(Rollout(tokens[:prompt_len], tokens[prompt_len:], [0.0] * response_len, FINISH_LENGTH, routes))
    return rollouts


def verl_fields(rollouts: list[Rollout], spec: MoESpec) -> dict[str, torch.Tensor]:
    return rollouts_to_verl_fields(rollouts, spec, prompt_length=PROMPT_WIDTH, response_length=RESPONSE_WIDTH)


def expected_packed(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight from the rollouts, in remove-padding order: ids ``[T, L, K]`` and which rows replay ``[T]``."""
    ids, routed = [], []
    for r in rollouts:
        rows = torch.from_numpy(r.routed_experts.ids.astype("int64"))
        ids.append(torch.cat([rows, rows[-1:]]))  # the final token's slot is never compared
        routed.append(torch.arange(r.num_tokens) < r.num_tokens - 1)
    return torch.cat(ids), torch.cat(routed)


def check_replayed(probe: RouteProbe, ids: torch.Tensor, routed: torch.Tensor, calls_per_layer: int) -> None:
    """Every expert call saw the given ids on routed rows and the router's own top-k on the others."""
    for layer in range(ids.shape[1]):
        assert len(probe.ids[layer]) == calls_per_layer
        for seen, logits in zip(probe.ids[layer], probe.logits[layer][: len(probe.ids[layer])]):
            seen = seen.reshape(-1, ids.shape[-1])[: ids.shape[0]]
            assert torch.equal(seen[routed], ids[routed, layer]), f"layer {layer}: replayed ids differ from the given ids"
            native = logits[: ids.shape[0]].topk(ids.shape[-1], dim=-1).indices
            assert torch.equal(seen[~routed].sort(-1).values, native[~routed].sort(-1).values), (
                f"layer {layer}: final-token rows did not route natively"
            )
