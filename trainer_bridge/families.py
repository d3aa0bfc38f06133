"""Every MoE causal-LM family the installed transformers ships, built tiny, and whether replay holds on it.

``python -m trainer_bridge.families [--markdown FILE]`` surveys the installed
transformers: it finds the families itself (nothing here names one), builds
each from its config class with random weights, and checks that exactly one of
these holds:

* **replays**: under replay, the experts that really compute each token are the
  replayed ones on 100% of routed rows (observed by perturbing one expert's
  weights at a time and seeing which tokens' outputs move, in the block's own
  forward, not read from the interceptor); ``-1`` rows get the trainer's own
  choice; every router weight gets a non-zero gradient; and replaying the
  model's own routes reproduces its native logits exactly;
* **refused**: ``replay()`` raises a ``ValueError`` before any forward, saying why.

*Families* are the config classes (``transformers.models.auto.CONFIG_MAPPING``)
that have a causal-LM head, or that are the language-model part (a
``sub_configs`` entry) of a multimodal config, and whose tiny model holds a
module named like a mixture of experts. The tests run the same survey, so a
newer transformers with new families is covered without editing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rollout.atomic import atomic_write_text
from rollout.moe_spec import EXPERT_COUNT_KEYS, LAYER_COUNT_KEYS, TOP_K_KEYS, MoESpec
from trainer_bridge.replay import record, replay
from trainer_bridge.routers import MoEBlock, find_moe_blocks

TINY_LAYERS = 2
TINY_EXPERTS = 8
TINY_TOP_K = 2
BATCH, SEQ = 2, 8
# Shrunk settings, applied to whichever of these keys a config has (its defaults are full-size).
TINY = {
    **{k: TINY_LAYERS for k in LAYER_COUNT_KEYS},
    **{k: TINY_EXPERTS for k in EXPERT_COUNT_KEYS},
    **{k: TINY_TOP_K for k in TOP_K_KEYS},
    "hidden_size": 64, "d_model": 64, "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2,
    "kv_n_heads": 4, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "ffn_hidden_size": 32,
    "expert_ffn_hidden_size": 32, "vocab_size": 256, "zero_expert_num": 2,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1, "moe_layer_start_index": 1,
    "moe_layer_end_index": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_head_dim": 16, "mamba_num_heads": 4,
    "ssm_state_size": 8, "mamba_n_groups": 1, "n_groups": 1, "vocab_size_per_layer_input": 256,
    "hidden_size_per_layer_input": 8, "is_moe": True, "enable_moe_block": True, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "n_shared_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 0,
    "expert_layer_period": 2, "expert_layer_offset": 1, "sliding_window": 8, "indexer_n_heads": 2,
    "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 4,
}
# Settings taken as given rather than only ever shrunk.
TINY_EXACT = (*LAYER_COUNT_KEYS, "is_moe", "enable_moe_block", "pad_token_id", "bos_token_id", "eos_token_id",
              "first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "moe_layer_end_index",
              "attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
# Multi-head latent attention (DeepSeek): its head_dim is the rotary part of a query head, and it has as many
# key/value heads as query heads (elsewhere TINY's two kv heads leave room for MiMo's doubled sliding-window ones).
TINY_MLA = {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4}
TINY_LAYER_KINDS = {"layer_types": ["full_attention"] * TINY_LAYERS, "mlp_layer_types": ["dense", "sparse"]}
# Any other integer setting named like a width and larger than this is shrunk to SMALL_WIDTH.
_WIDE = re.compile(r"(dim|size|rank|heads)$")
WIDE, SMALL_WIDTH = 64, 16
_MOE_NAMES = re.compile(r"expert|router", re.IGNORECASE)
_MOE_CLASSES = re.compile(r"Experts?$|Router$|Gating$|SparseMoe|MoEBlock|MoeBlock")
_MOE_CLASS_DEF = re.compile(r"^class \w*(Expert|Router|Gating|MoE|Moe)\w*\(", re.MULTILINE)
MAX_TINY_PARAMS = 5_000_000


class TinyBuildError(ValueError):
    """The family could not be built tiny from its config class (a limit of this survey's shrunk settings)."""


@dataclass(frozen=True)
class Family:
    model_type: str
    config_class: type
    model_class: type


def _sub_config_classes(model_types: list[str]) -> set[type]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    subs: set[type] = set()
    for model_type in model_types:
        with contextlib.suppress(Exception):
            subs.update(v for v in getattr(CONFIG_MAPPING[model_type], "sub_configs", {}).values() if isinstance(v, type))
    return subs


def _model_class(config_class: type, language_part: bool) -> type | None:
    """The family's causal LM, else (for a multimodal model's language part) its text model."""
    import transformers

    try:
        module = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    except Exception:
        return None
    classes = [
        c for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, transformers.PreTrainedModel) and getattr(c, "config_class", None) is config_class
    ]
    causal = [c for c in classes if c.__name__.endswith("ForCausalLM")]
    if causal:
        return causal[0]
    if language_part:
        bases = [c for c in classes if c.__name__.endswith("Model") and "PreTrained" not in c.__name__]
        return bases[0] if bases else None
    return None


def _shrink(defaults: dict[str, Any], layers: int, mrope: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in EXPERT_COUNT_KEYS and (value is None or isinstance(value, int)):
            out[key] = TINY_EXPERTS if value is None or not 1 < value <= TINY_EXPERTS else value
        elif key in TOP_K_KEYS and (value is None or isinstance(value, int)):
            out[key] = min(value or TINY_TOP_K, TINY_TOP_K)  # ZAYA supports top-1 only
        elif key in TINY and isinstance(value, int) and not isinstance(value, bool) and key not in TINY_EXACT:
            out[key] = min(value, TINY[key])  # never widen: a zero rotary dim (GLM-5 DSA) stays zero
        elif key in TINY and (value is None or isinstance(value, (int, bool))):
            out[key] = TINY[key]
        elif key in TINY and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            out[key] = [TINY[key]] * len(value)  # Ernie 4.5-VL: per-modality widths
        elif isinstance(value, int) and not isinstance(value, bool) and value > WIDE and _WIDE.search(key):
            out[key] = SMALL_WIDTH
        elif value is None and key in TINY_LAYER_KINDS:  # configs that leave a per-layer list to the checkpoint
            out[key] = TINY_LAYER_KINDS[key]
        elif isinstance(value, list) and len(value) == layers and layers > TINY_LAYERS:
            out[key] = _two_layers(value)
        elif isinstance(value, str) and len(value) == layers and layers > TINY_LAYERS and key.endswith("pattern"):
            out[key] = "".join(_two_layers(list(value)))
        elif isinstance(value, dict) and any(k in TINY for k in value):  # DBRX's attn_config / ffn_config
            out[key] = _shrink(value, layers)
    if "qk_rope_head_dim" in defaults:
        out.update({k: v if defaults[k] is None else min(v, defaults[k]) for k, v in TINY_MLA.items() if k in defaults})
        rope = defaults.get("rope_parameters")
        if isinstance(rope, dict) and "partial_rotary_factor" in rope:  # Mistral 4: rotary share of the tiny head
            out["rope_parameters"] = {**rope, "partial_rotary_factor": TINY_MLA["qk_rope_head_dim"] / TINY_MLA["head_dim"]}
    if isinstance(defaults.get("moe_layers"), list):
        out["moe_layers"] = list(range(TINY_LAYERS))
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and (mrope or isinstance(rope.get("mrope_section"), list)):
        # multimodal rotary sections (time, height, width) must fill the rotary half of the tiny head
        factor = rope.get("partial_rotary_factor", defaults.get("partial_rotary_factor")) or 1.0
        half = int(TINY["head_dim"] * factor) // 2
        out["rope_parameters"] = {**rope, "mrope_section": [half // 3 + (i < half % 3) for i in range(3)]}
    return out


def _two_layers(kinds: list[Any]) -> list[Any]:
    """A per-layer list for two layers that keeps the first kind and, if there is one, a different (MoE) kind."""
    other = next((k for k in kinds if k != kinds[0]), kinds[0])
    moe = next((k for k in kinds if isinstance(k, str) and re.search(r"moe|sparse|^E$", k)), other)
    return [kinds[0], moe]


def tiny_config(config_class: type) -> Any:
    """A two-layer config of this class with a few small experts."""
    defaults = config_class().to_dict()
    layers = next((defaults[k] for k in LAYER_COUNT_KEYS if isinstance(defaults.get(k), int)), TINY_LAYERS)
    source = Path(inspect.getfile(config_class).replace("configuration_", "modeling_"))
    mrope = source.exists() and "mrope_section" in source.read_text(errors="ignore")
    return config_class(**_shrink(defaults, layers, mrope))


def _is_moe(model: nn.Module) -> bool:
    """Independent of discovery: a module path or class named like experts or a router."""
    return any(_MOE_NAMES.search(name.rsplit(".", 1)[-1]) for name, _ in model.named_modules()) or any(
        _MOE_CLASSES.search(type(m).__name__) for m in model.modules()
    )


def _moe_source(model_type: str) -> bool:
    """Does the family's modeling file define expert or router classes? (Read as text: importing every module is slow.)"""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    path = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return path.exists() and bool(_MOE_CLASS_DEF.search(path.read_text(errors="ignore")))


def moe_families() -> list[Family]:
    """Every MoE causal-LM family (and multimodal language part) of the installed transformers, by model_type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    candidates = [mt for mt in sorted(CONFIG_MAPPING_NAMES) if _moe_source(mt)]
    subs = _sub_config_classes(candidates)
    families = []
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        for model_type in candidates:
            try:
                config_class = CONFIG_MAPPING[model_type]
                defaults = config_class().to_dict()
            except Exception:
                continue
            if defaults.get("is_encoder_decoder"):
                continue
            model_class = _model_class(config_class, config_class in subs)
            if model_class is None:
                continue
            try:
                with torch.device("meta"):
                    moe = _is_moe(model_class(tiny_config(config_class)))
            except Exception:  # cannot be built tiny: it counts if its config sets an expert count
                moe = any(isinstance(defaults.get(k), int) and defaults[k] > 1 for k in EXPERT_COUNT_KEYS)
            if moe:
                families.append(Family(model_type, config_class, model_class))
    return families


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def build_tiny(family: Family, seed: int = 0) -> nn.Module:
    """The family's tiny model, fp32, random weights, eval mode; ``ValueError`` if it cannot be built tiny."""
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(family.config_class)
            with torch.device("meta"):
                size = sum(p.numel() for p in family.model_class(config).parameters())
            if size > MAX_TINY_PARAMS:
                raise TinyBuildError(f"the tiny {family.model_type} still has {size:,} parameters")
            torch.manual_seed(seed)
            model = family.model_class(config).float().eval()
            with torch.no_grad():
                model(input_ids=tokens(model), use_cache=False)
        except TinyBuildError:
            raise
        except Exception as e:
            raise TinyBuildError(f"cannot build a tiny {family.model_type}: {type(e).__name__}: {e}") from e
    with torch.no_grad():  # some families initialise biases and bias-like buffers to zero: make them count
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype.is_floating_point and p.ndim == 1 and "bias" in name and float(p.abs().max() if p.numel() else 1) == 0:
                p.copy_(torch.rand(p.shape) * 0.1)
    return model


def tokens(model: nn.Module, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(3, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _output(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def random_routes(spec: MoESpec, seed: int, unrouted: float = 0.25) -> torch.Tensor:
    """Distinct random ids per row, ``unrouted`` of the rows ``-1``: routes unrelated to the model's own choice."""
    g = torch.Generator().manual_seed(seed)
    rows = BATCH * SEQ * len(spec.moe_layers)
    ids = torch.rand(rows, spec.num_experts, generator=g).argsort(-1)[:, : spec.top_k]
    ids = ids.reshape(BATCH, SEQ, len(spec.moe_layers), spec.top_k)
    ids[torch.rand(BATCH, SEQ, len(spec.moe_layers), generator=g) < unrouted] = -1
    return ids


# --- what really reaches the experts ------------------------------------------------------------------------------


def _expert_slices(block: MoEBlock, num_experts: int) -> list[list[tuple[torch.Tensor, slice | int]]]:
    """Per expert id: the (parameter, index) pieces that hold that expert's weights, for experts that all hold some.

    An expert id missing from any stacked parameter (LongCat's zero-compute experts: its ``down_proj`` has
    only the real experts) has no weights to perturb and gets no pieces: it cannot be observed.
    """
    pieces: list[list[tuple[torch.Tensor, slice | int]]] = [[] for _ in range(num_experts)]
    covered = set(range(num_experts))
    for experts in block.experts:
        if isinstance(experts, nn.ModuleList):
            for e, module in enumerate(experts):
                pieces[e].extend((p, slice(None)) for p in module.parameters())
            continue
        for p in experts.parameters(recurse=False):
            if p.ndim >= 2 and p.shape[0] <= num_experts:
                covered &= set(range(p.shape[0]))
                for e in range(p.shape[0]):
                    pieces[e].append((p, e))
            elif p.ndim == 2 and p.shape[0] % num_experts == 0:  # DBRX's folded [E * I, H]
                width = p.shape[0] // num_experts
                for e in range(num_experts):
                    pieces[e].append((p, slice(e * width, (e + 1) * width)))
    return [pieces[e] if e in covered else [] for e in range(num_experts)]


def experts_used(block: MoEBlock, num_experts: int, call: Callable[[], torch.Tensor]) -> list[set[int]]:
    """Per token of ``call()`` (the block's forward): the experts whose weights change its output."""
    slices = _expert_slices(block, num_experts)
    with torch.no_grad():
        out = call()
        base = out.reshape(-1, out.shape[-1])
        used: list[set[int]] = [set() for _ in range(base.shape[0])]
        g = torch.Generator().manual_seed(0)
        for e, pieces in enumerate(slices):
            if not pieces:
                continue  # an expert without weights (LongCat's zero-compute experts) cannot be observed
            saved = [(p, i, p[i].clone()) for p, i in pieces]
            for p, i, old in saved:
                p[i] = old + torch.randn(old.shape, generator=g)
            moved = (call().reshape(base.shape) - base).abs().amax(-1) > 1e-5 * (1 + base.abs().amax(-1))
            for p, i, old in saved:
                p[i] = old
            for t in moved.nonzero().flatten().tolist():
                used[t].add(e)
    return used


def observable_experts(block: MoEBlock, num_experts: int) -> set[int]:
    return {e for e, pieces in enumerate(_expert_slices(block, num_experts)) if pieces}


def _capture(captured: dict[int, tuple[tuple, dict]], row: int, args: tuple, kwargs: dict) -> None:
    if row not in captured:
        captured[row] = copy.deepcopy((args, kwargs))


@contextlib.contextmanager
def _block_inputs(blocks: list[MoEBlock]) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Each block's first inputs, copied as they were before it ran (it may write a KV cache they hold)."""
    captured: dict[int, tuple[tuple, dict]] = {}
    handles = [
        b.module.register_forward_pre_hook(
            lambda m, a, k, row=b.row: _capture(captured, row, a, k), with_kwargs=True
        )
        for b in blocks
    ]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _block_call(block: MoEBlock, inputs: tuple[tuple, dict]) -> Callable[[], torch.Tensor]:
    """Re-run the block on a fresh copy of its captured inputs each time: a block that writes a cache it is
    given (DiffusionGemma's encoder layers append their keys to the shared KV cache) would otherwise see its own
    earlier keys again and change shape or output from one call to the next."""

    def call() -> torch.Tensor:
        args, kwargs = copy.deepcopy(inputs)
        return _output(block.module(*args, **kwargs))

    return call


# --- the survey ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    model_type: str
    model_class: str
    status: str  # "replays", "refused", "not checked" (not built tiny), "check failed" (a bug: the contract broke)
    reason: str  # for all but "replays": the error's message
    spec: MoESpec | None

    @property
    def replays(self) -> bool:
        return self.status == "replays"


def forwards_counter(model: nn.Module) -> tuple[list[int], Any]:
    count = [0]
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    return count, handle


def check_family(family: Family) -> Outcome:
    """Build the family tiny and check the replay contract; ``AssertionError`` says what broke."""
    model = build_tiny(family)
    count, handle = forwards_counter(model)
    try:
        spec, blocks = find_moe_blocks(model)
        with replay(model, torch.full((BATCH, SEQ, len(spec.moe_layers), spec.top_k), -1)):
            pass
    except ValueError as e:
        assert count[0] == 0, f"{family.model_type}: refused after {count[0]} forwards"
        return Outcome(family.model_type, family.model_class.__name__, "refused", str(e), None)
    finally:
        handle.remove()
    _check_replay(model, spec, blocks)
    return Outcome(family.model_type, family.model_class.__name__, "replays", "", spec)


def _check_replay(model: nn.Module, spec: MoESpec, blocks: list[MoEBlock]) -> None:
    name = spec.model_type
    ids = tokens(model)
    with torch.no_grad():
        native_logits = _output(model(input_ids=ids, use_cache=False))
    with record(model) as rec, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    with replay(model, rec.routes, guard="off"), torch.no_grad():
        replayed = _output(model(input_ids=ids, use_cache=False))
    assert torch.equal(native_logits, replayed), f"{name}: replaying the native routes changed the logits"

    routes = random_routes(spec, seed=1)
    with _block_inputs(blocks) as native_inputs, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    with replay(model, routes, guard="off"):
        with _block_inputs(blocks) as inputs, torch.no_grad():
            model(input_ids=ids, use_cache=False)
        flat = routes.reshape(-1, len(spec.moe_layers), spec.top_k)
        for block in blocks:
            seen = experts_used(block, spec.num_experts, _block_call(block, inputs[block.row]))
            observable = observable_experts(block, spec.num_experts)
            for t, want in enumerate(flat[:, block.row].tolist()):
                if want[0] != -1:
                    assert seen[t] == set(want) & observable, (
                        f"{name} {block.name} token {t}: experts {sorted(seen[t])} computed, routes say {want}"
                    )
        loss = _output(model(input_ids=ids, use_cache=False)).float().square().mean()
        loss.backward()
    params = dict(model.named_parameters())
    for block in blocks:
        grad = params[block.router_weight].grad
        assert grad is not None and float(grad.abs().max()) > 0, f"{name}: {block.router_weight} got no gradient"
    # -1 rows route natively: on the first MoE block (whose input the replayed rows above cannot change)
    first = blocks[0]
    native_seen = experts_used(first, spec.num_experts, _block_call(first, native_inputs[first.row]))
    with replay(model, routes, guard="off"):
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        seen = experts_used(first, spec.num_experts, _block_call(first, native_inputs[first.row]))
    unrouted = (routes.reshape(-1, len(spec.moe_layers), spec.top_k)[:, first.row, 0] == -1).nonzero().flatten()
    assert len(unrouted) > 0
    for t in unrouted.tolist():
        assert seen[t] == native_seen[t], f"{name}: -1 row {t} computed {seen[t]}, native {native_seen[t]}"


def survey() -> list[Outcome]:
    out = []
    for family in moe_families():
        try:
            out.append(check_family(family))
        except TinyBuildError as e:
            out.append(Outcome(family.model_type, family.model_class.__name__, "not checked", str(e), None))
        except Exception as e:  # the survey reports every family, the failures included
            out.append(Outcome(family.model_type, family.model_class.__name__, "check failed", f"{type(e).__name__}: {e}", None))
    return out


PREAMBLE = """# MoE families tried with replay

Every MoE causal-LM family (and multimodal language model) that the installed transformers ships,
built tiny from its config class with random weights, and what `trainer_bridge.replay` does with it:
**replays** means the experts that compute each token are the replayed ones on 100% of routed rows,
`-1` rows route natively, every router weight gets a gradient, and replaying the model's own routes
reproduces its logits exactly; **refused** means a `ValueError` before any forward, quoted here.
**not checked** rows are families this survey could not build tiny (the reason is quoted); a
**check failed** row would be a bug (the contract broke) and fails `tests/trainer_bridge/test_families.py`.

Generated by `python -m trainer_bridge.families --markdown docs/families.md`, once per installed
transformers version; each run replaces its own version's section (`trainer_bridge/families.py`).
"""
SECTION = "## transformers "


def markdown(outcomes: list[Outcome]) -> str:
    """This transformers version's section of ``docs/families.md``."""
    import transformers

    lines = [
        "| family (`model_type`) | model class | outcome | reason / layout |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        if o.replays:
            assert o.spec is not None
            detail = f"MoE layers {list(o.spec.moe_layers)} of {o.spec.num_hidden_layers}, {o.spec.num_experts} experts, top-{o.spec.top_k}"
        else:
            detail = o.reason.replace("|", "\\|")
        lines.append(f"| `{o.model_type}` | `{o.model_class}` | {o.status} | {detail} |")
    counts = {status: sum(o.status == status for o in outcomes) for status in dict.fromkeys(o.status for o in outcomes)}
    head = (f"{SECTION}{transformers.__version__}\n\ntorch {torch.__version__}: {len(outcomes)} families; "
            + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".")
    return head + "\n\n" + "\n".join(lines) + "\n"


def merge_section(existing: str, section: str) -> str:
    """``existing`` (a families file, or "") with ``section`` replacing the one of its version; sections by version."""
    sections = {s.split("\n", 1)[0]: SECTION + s for s in existing.split("\n" + SECTION)[1:]}
    sections[section.split("\n", 1)[0][len(SECTION):]] = section
    key = lambda title: tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", title))  # noqa: E731
    return PREAMBLE + "".join("\n" + sections[t].rstrip("\n") + "\n" for t in sorted(sections, key=key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="write this version's section into this file (other versions' are kept)")
    args = parser.parse_args()
    section = markdown(survey())
    if args.markdown:
        path = Path(args.markdown)
        atomic_write_text(path, merge_section(path.read_text() if path.exists() else "", section))
    print(section)


if __name__ == "__main__":
    main()
