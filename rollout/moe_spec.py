"""Which layers of a model are MoE, how many experts it routes over, and how many each token picks.

Read from an HF ``config.json`` alone, so every component (engine capture,
SGLang decoding, rollout files, trainer replay) agrees on the route shape
without loading weights. No family table: transformers' MoE configs spell the
same facts in a handful of ways, and this module reads all of them:

* expert count: ``num_experts``, ``num_local_experts``, ``n_routed_experts``,
  ``moe_num_experts``, DBRX's ``ffn_config.moe_num_experts``; LongCat-Flash's
  zero-compute experts (``zero_expert_num``) are routed to like the others;
* top-k: ``num_experts_per_tok``, ``moe_k``, ``moe_topk``, ``top_k``, ...;
* MoE layers: an explicit per-layer list (``mlp_layer_types``,
  ``layers_block_type``, ``moe_layers``) or a rule (``mlp_only_layers`` with
  ``decoder_sparse_step``, ``first_k_dense_replace`` with ``moe_layer_freq``,
  ``num_dense_layers``, ``moe_layer_start_index``/``end_index``/``interval``,
  ``expert_layer_period``/``offset``), and switches that turn MoE off
  (``is_moe``, ``enable_moe_block``);
* multimodal checkpoints keep the language model's settings in ``text_config``.

The trainer side finds the same facts from the model's modules
(``trainer_bridge.routers``) and refuses a model for which the two disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from rollout.routed_experts import RoutedExperts

# LongCat-Flash counts two sub-layers per layer in num_hidden_layers; its num_layers is the layer count.
LAYER_COUNT_KEYS = ("num_layers", "num_hidden_layers", "n_layers", "n_layer")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_k",
    "moe_topk",
    "moe_top_k",
    "top_k",
    "top_k_experts",
    "n_activated_experts",
    "num_selected_experts",
)
# Experts that route like the others but compute nothing (LongCat-Flash): ids range over both.
ZERO_EXPERT_KEYS = ("zero_expert_num",)
# Per-layer lists that name each layer's MLP kind (attention-kind lists name no MoE kind and are skipped).
LAYER_KIND_KEYS = ("mlp_layer_types", "layers_block_type", "layer_types")
MOE_KINDS = ("moe", "sparse", "hash_moe")
# Nested sections that hold the language model's settings, and the FFN's (DBRX).
TEXT_KEYS = ("text_config", "language_config", "llm_config")
FFN_KEYS = ("ffn_config",)


def read_config(model_dir: str | os.PathLike) -> dict:
    """A checkpoint's ``config.json``, or a ``ValueError`` when the directory has none."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"no config.json in {str(model_dir)!r}: not an HF-format checkpoint")
    with open(path) as f:
        return json.load(f)


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return _with_defaults(dict(config))
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ValueError(f"a model config must be a dict or a transformers PretrainedConfig, got {type(config).__name__}")


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json omits settings equal to the config class's defaults: restore them when transformers knows the class."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[cfg["model_type"]](**cfg).to_dict()
    except Exception:  # unknown family, or a config its class rejects: read the file as it is
        return cfg


def _sections(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The language model's settings first (``text_config``), then the top level, then the FFN's (DBRX)."""
    text = [cfg[k] for k in TEXT_KEYS if isinstance(cfg.get(k), Mapping)]
    tops = [*text, cfg]
    return [*tops, *(s[k] for s in tops for k in FFN_KEYS if isinstance(s.get(k), Mapping))]


def _first_int(sections: list[Mapping[str, Any]], keys: tuple[str, ...]) -> int | None:
    for section in sections:
        for key in keys:
            value = section.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value > 0:
                return value
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                return int(value[0])  # Ernie 4.5-VL: [text, vision]; the language model routes over the first
    return None


def _first(sections: list[Mapping[str, Any]], key: str) -> Any:
    return next((s[key] for s in sections if s.get(key) is not None), None)


def _per_layer_length(sections: list[Mapping[str, Any]]) -> int | None:
    """Nemotron-H has no layer count key: its per-layer kind list is as long as the model."""
    for key in (*LAYER_KIND_KEYS, "hybrid_override_pattern"):
        kinds = _first(sections, key)
        if isinstance(kinds, (list, tuple, str)) and kinds:
            return len(kinds)
    return None


def _moe_layers(sections: list[Mapping[str, Any]], n_layers: int) -> tuple[int, ...]:
    """Which layers have routed experts, from whichever convention the config uses."""
    if any(s.get("is_moe") is False or s.get("enable_moe_block") is False for s in sections):
        return ()
    for key in LAYER_KIND_KEYS:
        kinds = _first(sections, key)
        if isinstance(kinds, str) and key == "layers_block_type":
            kinds = list(kinds)
        if isinstance(kinds, (list, tuple)) and len(kinds) == n_layers and any(k in MOE_KINDS for k in kinds):
            return tuple(i for i, k in enumerate(kinds) if k in MOE_KINDS)
    pattern = _first(sections, "hybrid_override_pattern")  # Nemotron-H: one letter a layer, "E" for MoE
    if isinstance(pattern, str) and len(pattern) == n_layers:
        return tuple(i for i, c in enumerate(pattern) if c == "E")
    explicit = _first(sections, "moe_layers")
    if isinstance(explicit, (list, tuple)):
        return tuple(sorted(int(i) for i in explicit if 0 <= int(i) < n_layers))
    return tuple(i for i in range(n_layers) if _is_moe_by_rule(sections, i))


def _is_moe_by_rule(sections: list[Mapping[str, Any]], i: int) -> bool:
    get = lambda key, default: next((s[key] for s in sections if s.get(key) is not None), default)  # noqa: E731
    if i in (get("mlp_only_layers", None) or []):
        return False
    if (i + 1) % int(get("decoder_sparse_step", 1) or 1) != 0:
        return False
    if i < int(get("first_k_dense_replace", 0) or 0) or i % int(get("moe_layer_freq", 1) or 1) != 0:
        return False
    if i < int(get("num_dense_layers", 0) or 0):
        return False
    start, end = get("moe_layer_start_index", None), get("moe_layer_end_index", None)
    if start is not None and (i < int(start) or (end is not None and int(end) >= 0 and i > int(end))):
        return False
    if start is not None and (i - int(start)) % int(get("moe_layer_interval", 1) or 1) != 0:
        return False
    period = get("expert_layer_period", None)
    if period is not None and i % int(period) != int(get("expert_layer_offset", 0) or 0):
        return False
    return True


@dataclass(frozen=True)
class MoESpec:
    model_type: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    @classmethod
    def from_config(cls, config: Any) -> "MoESpec":
        """Accept a dict (config.json) or a transformers ``PretrainedConfig``; ``ValueError`` if it describes no MoE."""
        cfg = _as_dict(config)
        model_type = str(cfg.get("model_type"))
        sections = _sections(cfg)
        n_layers = _first_int(sections, LAYER_COUNT_KEYS) or _per_layer_length(sections)
        if n_layers is None:
            raise ValueError(f"{model_type} config has none of {LAYER_COUNT_KEYS}: cannot tell the layer count")
        experts = _first_int(sections, EXPERT_COUNT_KEYS)
        moe_layers = _moe_layers(sections, n_layers) if experts is not None and experts > 1 else ()
        if not moe_layers:
            raise ValueError(
                f"unsupported model family {model_type!r}: its config describes no MoE layers (expert count from "
                f"{EXPERT_COUNT_KEYS}: {experts}); not a mixture-of-experts model, or one whose config this reader "
                "does not know"
            )
        assert experts is not None
        return cls(
            model_type=model_type,
            num_hidden_layers=n_layers,
            moe_layers=moe_layers,
            num_experts=experts + (_first_int(sections, ZERO_EXPERT_KEYS) or 0),
            top_k=cls.read_top_k(cfg),
        )

    @staticmethod
    def read_top_k(config: Any) -> int:
        """Experts per token, under any of ``TOP_K_KEYS`` (also nested in ``text_config`` / ``ffn_config``)."""
        cfg = _as_dict(config)
        top_k = _first_int(_sections(cfg), TOP_K_KEYS)
        if top_k is None:
            raise ValueError(f"{cfg.get('model_type')} config has none of {TOP_K_KEYS}: cannot tell the top-k")
        return top_k

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
