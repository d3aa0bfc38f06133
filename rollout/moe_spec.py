"""Which layers of a model are MoE, and how many experts each token picks.

Read from an HF ``config.json`` so every component (engine capture, SGLang
decoding, trainer replay) agrees on the route shape without loading weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from rollout.routed_experts import RoutedExperts


def read_config(model_dir: str | os.PathLike) -> dict:
    """A checkpoint's ``config.json``, or a ``ValueError`` when the directory has none."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"no config.json in {str(model_dir)!r}: not an HF-format checkpoint")
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class MoESpec:
    model_type: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    @classmethod
    def from_config(cls, config: Any) -> "MoESpec":
        """Accept a dict (config.json) or a transformers ``PretrainedConfig``."""
        cfg: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
        model_type = cfg.get("model_type")
        if model_type not in _FAMILIES:
            raise ValueError(
                f"unsupported model family {model_type!r}: known MoE families are {sorted(_FAMILIES)}"
            )
        experts_keys, is_moe = _FAMILIES[model_type]
        experts = next((cfg[k] for k in experts_keys if cfg.get(k) is not None), None)
        if experts is None:
            raise ValueError(f"{model_type} config has none of {experts_keys}: cannot tell the expert count")
        n_layers = int(cfg["num_hidden_layers"])
        return cls(
            model_type=model_type,
            num_hidden_layers=n_layers,
            moe_layers=tuple(i for i in range(n_layers) if is_moe(cfg, i)),
            num_experts=int(experts),
            top_k=int(cfg["num_experts_per_tok"]),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "MoESpec":
        return cls.from_config(read_config(model_dir))

    def check(self, routes: RoutedExperts, what: str = "routes") -> None:
        """Raise ``ValueError`` if ``routes`` were not recorded on a model of this shape."""
        if routes.moe_layers != self.moe_layers:
            raise ValueError(
                f"{what} cover MoE layers {list(routes.moe_layers)} but the model's MoE layers are {list(self.moe_layers)}"
            )
        if routes.top_k != self.top_k:
            raise ValueError(f"{what} have top_k={routes.top_k} but the model routes top_k={self.top_k}")
        if routes.num_experts != self.num_experts:
            raise ValueError(f"{what} have num_experts={routes.num_experts} but the model has {self.num_experts}")


def _qwen_is_moe(cfg: Mapping[str, Any], i: int) -> bool:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0


def _deepseek_is_moe(cfg: Mapping[str, Any], i: int) -> bool:
    freq = int(cfg.get("moe_layer_freq", 1) or 1)
    return i >= int(cfg.get("first_k_dense_replace", 0) or 0) and i % freq == 0


def _all_moe(cfg: Mapping[str, Any], i: int) -> bool:
    return True


# transformers 5 serialises some counts under aliases (num_experts -> num_local_experts).
_EXPERTS = ("num_experts", "num_local_experts")
_ROUTED = ("n_routed_experts",)
# model_type -> (config keys that may hold the routed expert count, layer predicate)
_FAMILIES = {
    "qwen3_moe": (_EXPERTS, _qwen_is_moe),
    "qwen2_moe": (_EXPERTS, _qwen_is_moe),
    "mixtral": (_EXPERTS, _all_moe),
    "olmoe": (_EXPERTS, _all_moe),
    "gpt_oss": (_EXPERTS, _all_moe),
    "deepseek_v3": (_ROUTED, _deepseek_is_moe),
    "glm4_moe": (_ROUTED, _deepseek_is_moe),
}
