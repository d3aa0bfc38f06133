"""Helpers shared by the trainer_bridge tests (importable by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from trainer_bridge.routers import moe_blocks_of

FAMILY_PRESETS = (
    "tiny-qwen3-moe",
    "tiny-qwen2-moe",
    "tiny-mixtral",
    "tiny-olmoe",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
    "tiny-glm4-moe",
)


class ExpertInputs:
    """Records the expert ids each MoE block hands to its experts module (the ids that really reach the experts)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.ids: dict[int, torch.Tensor] = {}
        self._handles = [
            block.module.experts.register_forward_pre_hook(self._hook(block.row))
            for block in moe_blocks_of(model)[1]
        ]

    def _hook(self, row: int):
        def hook(module, args):
            self.ids[row] = args[1].detach().clone()

        return hook

    def stacked(self) -> torch.Tensor:
        """``[num_tokens, L, K]`` of the last forward."""
        return torch.stack([self.ids[r] for r in sorted(self.ids)], dim=1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def random_routes(shape: tuple[int, ...], num_layers: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Distinct random expert ids per row: routes unrelated to the model's own choice."""
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.tensor(shape).prod()) * num_layers
    ids = torch.rand(rows, num_experts, generator=g).argsort(-1)[:, :top_k]
    return ids.reshape(*shape, num_layers, top_k)
