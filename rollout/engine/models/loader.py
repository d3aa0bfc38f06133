"""Read an HF checkpoint (``config.json`` + safetensors) into the engine's fused layout.

The engine's tensors are allocated once from the layout (``rollout/engine/weights.py``) and
every checkpoint tensor is copied into its slice: per-expert hub tensors land in the
stacked ``gate_up [E, 2I, H]`` / ``down [E, H, I]``, q/k/v in one projection, and
transformers' fused expert layout (``experts.gate_up_proj``) is read as is. The same
table serves ``Engine.update_weights``, so a checkpoint loads exactly as an update of the
same tensors writes. Tensors the layout does not know (extra heads, buffers) are skipped;
a missing one is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rollout.engine.models import arch_from_config
from rollout.engine.models.arch import ModelArch
from rollout.engine.weights import LayerWeights, ModelWeights, WeightLayout, engine_tensors
from rollout.moe_spec import read_config

__all__ = ["LayerWeights", "ModelWeights", "load_weights", "layout_for", "read_checkpoint_tensors"]


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``path`` (a directory), read without pickle."""
    directory = Path(path)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise ValueError(f"{str(path)!r} is not a directory with *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key in tensors:
                        raise ValueError(f"tensor {key!r} appears in two files under {str(path)!r}")
                    tensors[key] = handle.get_tensor(key)
        except SafetensorError as exc:
            raise ValueError(f"{f.name}: not a readable safetensors file ({exc})") from None
    return tensors


class _Tensors:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {str(model_dir)!r}")
        self._where: dict[str, object] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                self._where[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)  # type: ignore[attr-defined]


def layout_for(arch: ModelArch, has_lm_head: bool) -> WeightLayout:
    """The layout of a model; the LM head is the embedding when tied and the checkpoint has no ``lm_head``.

    An engine's layout is ``layout_for(arch, weights.lm_head is not weights.embed)``.
    """
    if not has_lm_head and not arch.tie_word_embeddings:
        raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
    return WeightLayout(arch, tied_embeddings=not has_lm_head)


def load_weights(model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> tuple[ModelArch, ModelWeights]:
    model_dir = Path(model_dir)
    arch = arch_from_config(read_config(model_dir))
    t = _Tensors(model_dir)
    layout = layout_for(arch, "lm_head.weight" in t)
    weights = layout.allocate(device, dtype)
    targets = engine_tensors(weights)
    written = []
    for name in t.names():
        if name in layout.slots:
            write = layout.check(name, t.get(name))
            layout.apply([write], targets)  # one at a time: host memory holds one tensor, not the checkpoint
            written.append(write.slot)
    absent = layout.missing(written)
    if absent is not None:
        raise ValueError(f"checkpoint has no tensor {absent!r}")
    return arch, weights
