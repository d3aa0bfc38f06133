"""Find the MoE blocks of a transformers model and intercept each one's expert selection.

Every MoE family in transformers 5 picks experts with one ``torch.topk`` over a
``[num_tokens, num_experts]`` score tensor, inside the MoE block's forward:

* Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral: in the router module, on the softmax
  probabilities, followed (or not) by renormalisation;
* gpt-oss: in the router module, on the raw logits, followed by a softmax over
  the selected values (top-k then softmax);
* DeepSeek-V3, GLM4-MoE: in ``route_tokens_to_experts``, on sigmoid scores plus
  the selection-only bias with non-selected groups masked to ``-inf``; the
  model then gathers the *un-biased* sigmoid scores at the chosen ids itself.

So the one point all of them share is that ``topk`` call, and its input is
always the full score tensor (never scores already zeroed after selection).
Replacing its result with ``(scores.gather(ids), ids)`` makes each model apply
its own normalisation, bias handling and scaling to the replayed ids, and
keeps the gradient path from the gate weights back to the router weight.
Interception is a ``TorchFunctionMode`` active only while a block's forward
runs (and suspended while its ``experts`` child runs, whose per-expert ops
would otherwise each pay a Python call), so it also sees ``Tensor.topk`` calls
and needs no per-model rewrite and no knowledge of the transformers version: it depends on behaviour (one
top-k of ``top_k`` over ``num_experts`` scores per block call), which is what
the checks here verify. Group-limited top-k calls (DeepSeek's ``topk(2)`` per
group and ``topk(topk_group)`` over groups) act on other shapes and pass through.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rollout.moe_spec import MoESpec

# Children that hold the router weight ``[num_experts, hidden]`` in transformers MoE blocks.
_ROUTER_NAMES = ("gate", "router")
_TOPK_FUNCS = (torch.topk, torch.Tensor.topk)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Class-name fragments used only to list candidates when a model cannot be patched.
_MOE_HINTS = ("moe", "expert", "router", "gate")

TopK = torch.return_types.topk
# (block, scores [N, E], native top-k) -> the selection the block must use
SelectFn = Callable[["MoEBlock", torch.Tensor, TopK], TopK]


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block: ``row`` is its index in ``MoESpec.moe_layers`` (and in a route tensor's layer axis)."""

    name: str
    module: nn.Module
    router: nn.Module
    layer: int
    row: int


def _router_of(module: nn.Module, num_experts: int) -> nn.Module | None:
    if not isinstance(getattr(module, "experts", None), nn.Module):
        return None
    for name in _ROUTER_NAMES:
        child = getattr(module, name, None)
        weight = getattr(child, "weight", None)
        if isinstance(child, nn.Module) and isinstance(weight, torch.Tensor) and weight.shape[0] == num_experts:
            return child
    return None


def _moe_candidates(model: nn.Module) -> list[str]:
    names = [
        f"{name} ({type(mod).__name__})"
        for name, mod in model.named_modules()
        if name and any(h in type(mod).__name__.lower() for h in _MOE_HINTS)
    ]
    return names[:12] + ([f"... {len(names) - 12} more"] if len(names) > 12 else [])


# model -> (spec, blocks): walking every module costs milliseconds, and replay opens once per micro-batch
_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, tuple[MoESpec, list[MoEBlock]]]" = weakref.WeakKeyDictionary()


def moe_blocks_of(model: nn.Module) -> tuple[MoESpec, list[MoEBlock]]:
    """The model's ``MoESpec`` (from its config) and MoE blocks, found once per model."""
    cached = _BLOCKS.get(model)
    if cached is None:
        spec = MoESpec.from_config(model.config)
        cached = _BLOCKS[model] = (spec, find_moe_blocks(model, spec))
    return cached


def find_moe_blocks(model: nn.Module, spec: MoESpec) -> list[MoEBlock]:
    """The MoE blocks in layer order, one per ``spec.moe_layers`` entry, or a ``ValueError`` listing what was found."""
    found: dict[int, tuple[str, nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        router = _router_of(module, spec.num_experts)
        match = _LAYER_INDEX.search(name + ".")
        if router is None or match is None:
            continue
        layer = int(match.group(1))
        if layer in found:
            raise ValueError(f"two MoE blocks claim layer {layer}: {found[layer][0]} and {name}")
        found[layer] = (name, module, router)
    if tuple(sorted(found)) != spec.moe_layers:
        raise ValueError(
            f"cannot patch this {spec.model_type} model: expected MoE blocks (a module with an `experts` child and a "
            f"`gate`/`router` of {spec.num_experts} experts) at layers {list(spec.moe_layers)}, found them at "
            f"{sorted(found)}; MoE-like modules: {_moe_candidates(model) or 'none'}"
        )
    return [MoEBlock(found[l][0], found[l][1], found[l][2], l, row) for row, l in enumerate(spec.moe_layers)]


def _topk_call(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor, int, int, bool]:
    """(input, k, dim, largest) of a ``torch.topk`` / ``Tensor.topk`` call."""
    names = ("input", "k", "dim", "largest")
    defaults = {"dim": -1, "largest": True}
    values = {n: (args[i] if i < len(args) else kwargs.get(n, defaults.get(n))) for i, n in enumerate(names)}
    if values["input"] is None:
        values["input"] = kwargs.get("self")
    return values["input"], int(values["k"]), int(values["dim"]), bool(values["largest"])


class _SelectionMode(TorchFunctionMode):
    """Active during one block forward; swaps the first expert-selection top-k for ``select``'s answer."""

    def __init__(self, block: MoEBlock, spec: MoESpec, select: SelectFn) -> None:
        super().__init__()
        self.block, self.spec, self.select = block, spec, select
        self.selections = 0

    def _is_selection(self, scores: Any, k: int, dim: int, largest: bool) -> bool:
        return (
            isinstance(scores, torch.Tensor)
            and scores.ndim == 2
            and scores.shape[-1] == self.spec.num_experts
            and k == self.spec.top_k
            and dim in (-1, 1)
            and largest
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func not in _TOPK_FUNCS or self.selections:
            return result
        scores, k, dim, largest = _topk_call(args, kwargs)
        if not self._is_selection(scores, k, dim, largest):
            return result
        self.selections += 1
        return self.select(self.block, scores, result)


@contextlib.contextmanager
def intercept_selection(blocks: Sequence[MoEBlock], spec: MoESpec, select: SelectFn) -> Iterator[None]:
    """While open, every forward of each block (first pass or checkpoint recompute) routes through ``select``."""
    patched: list[nn.Module] = []
    try:
        for block in blocks:
            for module in (block.module, block.module.experts):
                if "forward" in vars(module):
                    raise ValueError(f"{block.name} is already under replay or record; nest neither")
            active: list[_SelectionMode] = []  # the mode of the block forward now running, if any
            block.module.forward = _wrap_block(block, spec, select, block.module.forward, active)
            patched.append(block.module)
            block.module.experts.forward = _wrap_experts(block.module.experts.forward, active)
            patched.append(block.module.experts)
        yield
    finally:
        for module in patched:
            del module.forward


def _wrap_block(
    block: MoEBlock, spec: MoESpec, select: SelectFn, original: Callable[..., Any], active: list[_SelectionMode]
) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        mode = _SelectionMode(block, spec, select)
        active.append(mode)
        try:
            with mode:
                out = original(*args, **kwargs)
        finally:
            active.pop()
        if mode.selections == 0:
            raise ValueError(
                f"{block.name} ({type(block.module).__name__}) made no top-{spec.top_k} selection over "
                f"{spec.num_experts} expert scores that could be intercepted; this MoE implementation is not supported"
            )
        return out

    return forward


def _wrap_experts(original: Callable[..., Any], active: list[_SelectionMode]) -> Callable[..., Any]:
    """Run the experts outside the selection mode: their per-expert ops (hundreds) need no interception."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        depth = torch._C._len_torch_function_stack()
        if active and depth and torch._C._get_function_stack_at(depth - 1) is active[-1]:
            with torch.overrides._pop_mode_temporarily():
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    return forward
