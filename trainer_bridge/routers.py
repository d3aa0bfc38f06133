"""Find the MoE blocks of a transformers model from its module tree, and intercept each one's expert selection.

**Discovery is structural.** No family table and no child names:

* *experts* are the modules that hold stacked expert weights: a parameter of
  three or more dimensions whose leading dimension counts experts
  (``[E, 2I, H]``, Granite's ``ParallelExperts``), a ``ModuleList`` of
  identical expert MLPs, or DBRX's folded ``[E*I, H]`` matrices;
* the *router* is the one 2-D parameter ``[E, H]`` outside the experts, in the
  nearest module above them (``gate.weight``, ``router.layer.weight``,
  ``gate.wg.weight``, ``router.classifier.weight``, a router that is itself
  the parameter's owner, ...). ``E`` is its row count (zero-compute experts
  included, as in LongCat-Flash);
* the *block* is the nearest module that holds both, and its *layer* is its
  index in the outermost ``ModuleList`` above it, whatever that list is called
  (``layers``, ``blocks``, ``language_model.layers``);
* *top-k* is the block's or router's own setting (``top_k``,
  ``num_experts_per_tok``, ``moe_k``, ...).

Before any forward, each block's code is read (the code objects reachable from
its ``forward``, through its children, methods and module-level helpers) to
check that it selects with one top-k. Blocks that do not are refused with the
mechanism named: hash routing (a token → expert table), selection inside the
experts module, or selection without a top-k (PhiMoE's ``sparsemixer``). A
decoder layer with two routing decisions (JetMoE's attention experts, Ernie
4.5-VL's text and vision experts) is refused too: a route row holds one
decision per layer.

**Interception.** Every accepted family picks experts with one ``torch.topk``
over an ``[..., E]`` score tensor inside the block's forward, on the full
scores (softmax, sigmoid, biased or group-masked). Replacing its result with
``(scores.gather(ids), ids)`` makes each model apply its own normalisation,
bias handling and scaling to the replayed ids, and keeps the gradient path from
the gate weights back to the router weight. Where the scores were group-masked
(``masked_fill`` / ``where``) before the top-k, replayed rows gather the
unmasked scores, so a forced expert outside the native groups keeps its real
gate weight. The interception is a ``TorchFunctionMode`` active only while a
block's routing code runs: it is suspended inside the experts, whose per-expert
ops would otherwise each pay a Python call.

Those modes use private torch APIs; they are all in this module
(:func:`_mode_is_innermost`, :func:`_suspended_modes`, :func:`in_checkpoint_recompute`).
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rollout.moe_spec import TOP_K_KEYS, MoESpec

_TOPK_FUNCS = (torch.topk, torch.Tensor.topk)
_MASK_FUNCS = (torch.masked_fill, torch.Tensor.masked_fill, torch.where)
# Class-name fragments used only to list candidates when a model has no MoE block that can be found.
_MOE_HINTS = ("moe", "expert", "router", "gate")
# How deep the code reader follows calls from a block's forward (block -> router -> helper -> ...).
_MAX_CALL_DEPTH = 6

TopK = torch.return_types.topk
# (block, scores [..., E], native top-k, unmasked scores) -> the selection the block must use
SelectFn = Callable[["MoEBlock", torch.Tensor, TopK, torch.Tensor], TopK]


# --- private torch APIs, in one place -------------------------------------------------------------------------


def _mode_is_innermost(mode: TorchFunctionMode) -> bool:
    depth = torch._C._len_torch_function_stack()
    return bool(depth) and torch._C._get_function_stack_at(depth - 1) is mode


def _suspended_modes() -> contextlib.AbstractContextManager:
    return torch.overrides._pop_mode_temporarily()


def in_checkpoint_recompute() -> bool:
    """True while autograd runs a backward (activation-checkpoint recompute), so a forward is not counted twice."""
    return torch._C._current_graph_task_id() != -1


# --- discovery --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block: ``row`` is its index in ``MoESpec.moe_layers`` (and in a route tensor's layer axis)."""

    name: str
    module: nn.Module
    router: nn.Module  # the module that owns the router weight (``router.weight``)
    router_weight: str  # the router weight's qualified name in the model
    experts: tuple[nn.Module, ...]  # the modules holding expert weights: the experts computation
    layer: int
    row: int


def _children_names(names: Iterable[str], prefix: str) -> Iterator[str]:
    start = prefix + "." if prefix else ""
    return (n for n in names if n.startswith(start) and n != prefix)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or not prefix


def _ancestors(name: str) -> Iterator[str]:
    """Module names above ``name``, nearest first, ending with the root ``""``."""
    while name:
        name = _parent(name)
        yield name


def _expert_anchors(modules: dict[str, nn.Module]) -> dict[str, tuple[set[int], bool]]:
    """name -> (candidate expert counts, folded?) for modules that hold stacked expert weights."""
    anchors: dict[str, tuple[set[int], bool]] = {}
    for name, module in modules.items():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)):
            continue
        own = [p for p in module.parameters(recurse=False)]
        stacked = {p.shape[0] for p in own if p.ndim >= 3 and p.shape[0] > 1}
        if stacked:
            anchors[name] = (stacked, False)
        elif isinstance(module, nn.ModuleList) and len(module) > 1:
            kinds = {(type(m), tuple(tuple(p.shape) for p in m.parameters())) for m in module}
            if len(kinds) == 1 and next(iter(kinds))[1]:
                anchors[name] = ({len(module)}, False)
        else:
            matrices = [p for p in own if p.ndim == 2]
            if len(matrices) >= 2 and len({p.shape for p in matrices}) == 1:
                anchors[name] = ({matrices[0].shape[0]}, True)  # DBRX: [E * I, H], E read off the router
    return anchors


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _in_layer_list(name: str, modules: dict[str, nn.Module]) -> bool:
    """``name`` is an entry of a ModuleList, or below one."""
    return any(isinstance(modules.get(_parent(a)), nn.ModuleList) for a in [name, *_ancestors(name)] if a)


def _router_fits(rows: int, counts: set[int], folded: bool) -> bool:
    if folded:
        return any(c % rows == 0 and c // rows >= 2 for c in counts) and rows >= 2
    return rows in counts


@dataclass
class _Found:
    name: str
    router_weight: str
    experts: list[str]
    num_experts: int


def _find_blocks(model: nn.Module) -> list[_Found]:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    # Experts live inside a decoder layer, an entry of a ModuleList (which rules out the layer list itself, a
    # ModuleList of identical modules too). An anchor inside another one (stacked weights inside a ModuleList
    # of experts) belongs to the outer one.
    anchors = {a: v for a, v in _expert_anchors(modules).items() if _in_layer_list(a, modules)}
    anchors = {a: v for a, v in anchors.items() if not any(b != a and _within(a, b) for b in anchors)}
    found: dict[str, _Found] = {}
    for anchor in sorted(anchors, key=lambda a: (a.count("."), a)):
        counts, folded = anchors[anchor]
        if any(_within(anchor, f.name) and anchor in f.experts for f in found.values()):
            continue
        for block in _ancestors(anchor):
            if isinstance(modules[block], nn.ModuleList):
                break  # reached the layer list: no router above these experts inside their layer
            others = [a for a in anchors if _within(a, block)]
            routers = [
                p
                for p in _children_names(params, block)
                if params[p].ndim == 2
                and p.endswith("weight")
                and not any(_within(p, a) for a in others)
                and _router_fits(params[p].shape[0], counts, folded)
            ]
            if not routers:
                continue
            if len(routers) > 1:  # e.g. a gate of another purpose that happens to have E rows: keep the one feeding a top-k
                routers = [r for r in routers if _feeds_topk(modules, r, block, [modules[a] for a in others])] or routers
            if len(routers) > 1:
                raise ValueError(f"MoE block {block or type(model).__name__} has several router-like weights: {routers}")
            rows = params[routers[0]].shape[0]
            experts = [a for a in others if _router_fits(rows, anchors[a][0], anchors[a][1])]
            if block in found and found[block].router_weight != routers[0]:
                raise ValueError(f"MoE block {block} has two routers: {found[block].router_weight} and {routers[0]}")
            found[block] = _Found(block, routers[0], experts, rows)
            break
    return sorted(found.values(), key=lambda f: f.name)


def _feeds_topk(modules: dict[str, nn.Module], weight: str, block: str, experts: list[nn.Module]) -> bool:
    """Does the code of a module between this weight's owner and the block (exclusive) call a top-k?"""
    owner = _parent(weight)
    while owner != block and _within(owner, block):
        if "topk" in _read_routing_code(modules[owner], experts).names:
            return True
        owner = _parent(owner)
    return False


def _layer_of(model: nn.Module, block: str) -> tuple[str, int]:
    """(layer list name, index) of the outermost ``ModuleList`` entry above ``block``."""
    modules = dict(model.named_modules())
    outer: tuple[str, int] | None = None
    for anc in [block, *_ancestors(block)]:
        if anc and isinstance(modules.get(_parent(anc)), nn.ModuleList):
            outer = (_parent(anc), int(anc.rsplit(".", 1)[-1]))
    if outer is None:
        raise ValueError(f"MoE block {block} is in no layer list (nn.ModuleList) of {type(model).__name__}")
    return outer


def _int_attr(objs: Sequence[Any], keys: Sequence[str]) -> int | None:
    for obj in objs:
        for key in keys:
            value = getattr(obj, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None


def _top_k_of(block: nn.Module, router: nn.Module, model: nn.Module) -> int | None:
    """The block's own top-k setting: attributes of the router and block, then their configs, then the model's."""
    own = _int_attr([router, block], TOP_K_KEYS)
    if own is not None:
        return own
    configs = [getattr(m, "config", None) for m in (router, block)] + [getattr(model, "config", None)]
    for config in configs:
        if config is not None:
            try:
                return MoESpec.read_top_k(config)
            except ValueError:
                continue
    return None


# --- reading the routing code -------------------------------------------------------------------------------------


def _code_objects(fn: Any) -> list[types.CodeType]:
    fn = getattr(fn, "__func__", fn)
    try:
        fn = inspect.unwrap(fn)
    except ValueError:
        pass
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    out, stack = [], [code]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


def _own_methods(module: nn.Module, name: str) -> list[Any]:
    """``module.name`` as functions: the instance's own override, else every non-torch definition in the MRO (super())."""
    if name in vars(module):
        return [vars(module)[name]]
    found = []
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.") or name not in vars(cls):
            continue
        found.append(vars(cls)[name])
    return found


@dataclass
class _CodeReach:
    names: set[str]  # attribute / global names used by the routing code (experts excluded)
    expert_names: set[str]  # ... by the experts' code
    helpers: list[str]  # module-level functions and router forwards the routing code calls, for messages


def _read_routing_code(block: nn.Module, experts: Sequence[nn.Module]) -> _CodeReach:
    reach = _CodeReach(set(), set(), [])
    expert_ids = {id(e) for e in experts}
    seen: set[tuple[int, int]] = set()
    work: list[tuple[nn.Module, Any, int, bool]] = [(block, fn, 0, False) for fn in _own_methods(block, "forward")]
    while work:
        owner, fn, depth, in_experts = work.pop()
        key = (id(owner), id(getattr(fn, "__func__", fn)))
        if key in seen or depth > _MAX_CALL_DEPTH:
            continue
        seen.add(key)
        codes = _code_objects(fn)
        names = {n for c in codes for n in c.co_names}
        (reach.expert_names if in_experts else reach.names).update(names)
        fn_globals = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__globals__", {})
        for n in names:
            child = owner._modules.get(n) if isinstance(owner, nn.Module) else None
            if isinstance(child, nn.Module):
                inside = in_experts or id(child) in expert_ids
                if not inside:
                    reach.helpers.append(f"{type(child).__name__}.forward")
                work.extend((child, f, depth + 1, inside) for f in _own_methods(child, "forward"))
                continue
            if isinstance(owner, nn.Module):
                work.extend((owner, f, depth + 1, in_experts) for f in _own_methods(owner, n))
            target = fn_globals.get(n)
            if isinstance(target, types.FunctionType) and not target.__module__.startswith("torch"):
                if not in_experts:
                    reach.helpers.append(target.__name__)
                work.append((owner, target, depth + 1, in_experts))
    return reach


def _hash_table(block: nn.Module, router: nn.Module, top_k: int, num_experts: int) -> str | None:
    """Name of an integer table ``[vocab, top_k]`` that maps token ids to experts (hash routing), if any."""
    for owner in (router, block):
        for name, buf in list(owner.named_buffers(recurse=False)) + list(owner.named_parameters(recurse=False)):
            if not buf.dtype.is_floating_point and buf.ndim == 2 and buf.shape[-1] == top_k and buf.shape[0] > num_experts:
                return name
    return None


def _refusal(b: MoEBlock, top_k: int, num_experts: int) -> str | None:
    """Why this block's selection cannot be replayed (read from its code, before any forward), or ``None``."""
    table = _hash_table(b.module, b.router, top_k, num_experts)
    if table is not None:
        return (
            f"hash routing: {b.name} ({type(b.module).__name__}) takes its experts from the fixed token -> expert "
            f"table `{table}`, not from a top-k over router scores"
        )
    reach = _read_routing_code(b.module, b.experts)
    if "topk" in reach.names:
        return None
    if "topk" in reach.expert_names:
        names = ", ".join(type(e).__name__ for e in b.experts)
        return f"selection inside the experts: {b.name} lets its experts module ({names}) pick the experts itself"
    via = ", ".join(dict.fromkeys(reach.helpers)) or f"{type(b.module).__name__}.forward"
    return (
        f"selection is not one top-k: {b.name} ({type(b.module).__name__}) picks experts without a top-k over its "
        f"router scores (its routing code runs through {via})"
    )


def _moe_candidates(model: nn.Module) -> list[str]:
    names = [
        f"{name} ({type(mod).__name__})"
        for name, mod in model.named_modules()
        if name and any(h in type(mod).__name__.lower() for h in _MOE_HINTS)
    ]
    return names[:12] + ([f"... {len(names) - 12} more"] if len(names) > 12 else [])


# model -> (spec, blocks): walking every module and reading the routing code costs milliseconds, and
# replay opens once per micro-batch
_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, tuple[MoESpec, list[MoEBlock]]]" = weakref.WeakKeyDictionary()


def moe_blocks_of(model: nn.Module) -> tuple[MoESpec, list[MoEBlock]]:
    """The model's ``MoESpec`` and MoE blocks, found once per model (see :func:`find_moe_blocks`)."""
    cached = _BLOCKS.get(model)
    if cached is None:
        cached = _BLOCKS[model] = find_moe_blocks(model)
    return cached


def _locate(model: nn.Module) -> tuple[str, list[tuple[_Found, int]]]:
    """(layer list name, [(block, layer index)] in layer order), or a ``ValueError`` if there is no single layout."""
    found = _find_blocks(model)
    if not found:
        raise ValueError(
            f"no MoE block found in {type(model).__name__}: no module holds stacked expert weights next to a router "
            f"weight [num_experts, hidden]{_routerless_experts(model)}; MoE-like modules: {_moe_candidates(model) or 'none'}"
        )
    located = [(f, *_layer_of(model, f.name)) for f in found]
    stacks = sorted({stack for _, stack, _ in located})
    if len(stacks) > 1:
        raise ValueError(f"MoE blocks sit in more than one layer list ({stacks}); one route layout cannot cover them")
    counts = {f.num_experts for f in found}
    if len(counts) > 1:
        raise ValueError(f"MoE blocks route over different expert counts {sorted(counts)}: {[f.name for f in found]}")
    return stacks[0], sorted(((f, layer) for f, _, layer in located), key=lambda t: (t[1], t[0].name))


def _routerless_experts(model: nn.Module) -> str:
    """For the refusal message: experts that were found without a router, and the matrices beside them."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    anchors = {a: v for a, v in _expert_anchors(modules).items() if _in_layer_list(a, modules)}
    for anchor, (counts, _) in sorted(anchors.items()):
        block = _parent(anchor)
        beside = {p: tuple(params[p].shape) for p in _children_names(params, block)
                  if params[p].ndim == 2 and not any(_within(p, a) for a in anchors)}
        return (
            f". The experts at {anchor} hold {sorted(counts)} experts, but the 2-D weights beside them in {block} are "
            f"{beside or 'none'}: a router that scores another number of classes than there are experts (a skip "
            "expert, shared-expert gates) has no route layout here"
        )
    return ""


def _router_module(model: nn.Module, weight: str) -> nn.Module:
    return model.get_submodule(weight.rsplit(".", 1)[0]) if "." in weight else model


def model_moe_spec(model: nn.Module) -> MoESpec:
    """The route layout the model's own modules imply (layers, experts, top-k), whether or not it can be replayed."""
    return _spec_of(model, *_locate(model))


def _spec_of(model: nn.Module, stack: str, located: list[tuple[_Found, int]]) -> MoESpec:
    top_ks = {f.name: _top_k_of(model.get_submodule(f.name), _router_module(model, f.router_weight), model) for f, _ in located}
    if None in top_ks.values() or len(set(top_ks.values())) > 1:
        raise ValueError(f"cannot tell one top-k for the MoE blocks: {top_ks}")
    top_k = next(iter(top_ks.values()))
    assert top_k is not None
    return MoESpec(
        model_type=str(getattr(getattr(model, "config", None), "model_type", type(model).__name__)),
        num_hidden_layers=len(model.get_submodule(stack)),
        moe_layers=tuple(sorted({layer for _, layer in located})),
        num_experts=located[0][0].num_experts,
        top_k=top_k,
    )


def find_moe_blocks(model: nn.Module) -> tuple[MoESpec, list[MoEBlock]]:
    """The model's route layout and its MoE blocks in layer order, or a ``ValueError`` saying why it cannot be replayed.

    Everything here is decided before any forward. The layout is checked against
    ``MoESpec.from_config(model.config)``, which the rollout side uses to shape routes from
    ``config.json`` alone: both must agree.
    """
    stack, located = _locate(model)
    by_layer: dict[int, list[str]] = {}
    for f, layer in located:
        by_layer.setdefault(layer, []).append(f.name)
    doubled = {layer: names for layer, names in by_layer.items() if len(names) > 1}
    if doubled:
        layer, names = min(doubled.items())
        raise ValueError(
            f"more than one routing decision per layer: layer {layer} routes through {len(names)} MoE blocks "
            f"({', '.join(names)}); a route row holds one top-k per layer, so this model cannot be replayed"
        )
    spec = _spec_of(model, stack, located)
    blocks = [
        MoEBlock(
            f.name,
            model.get_submodule(f.name),
            _router_module(model, f.router_weight),
            f.router_weight,
            tuple(model.get_submodule(e) for e in f.experts),
            layer,
            row,
        )
        for row, (f, layer) in enumerate(located)
    ]
    refusals = [r for b in blocks if (r := _refusal(b, spec.top_k, spec.num_experts))]
    if refusals:
        more = f" (and {len(refusals) - 1} more blocks)" if len(refusals) > 1 else ""
        raise ValueError(f"cannot replay this {type(model).__name__}: {refusals[0]}{more}")
    _check_against_config(model, spec)
    return spec, blocks


def _check_against_config(model: nn.Module, spec: MoESpec) -> None:
    """The rollout side shapes routes from config.json (``MoESpec.from_config``); the model must agree with it."""
    config = getattr(model, "config", None)
    if config is None:
        return
    try:
        declared = MoESpec.from_config(config)
    except ValueError as e:
        raise ValueError(f"the model has MoE blocks ({spec}) but its config cannot say so: {e}") from None
    if declared == spec:
        return
    fields = ("num_hidden_layers", "moe_layers", "num_experts", "top_k")
    diff = "; ".join(
        f"{f} {getattr(declared, f)} in config.json but {getattr(spec, f)} in the model" for f in fields
        if getattr(declared, f) != getattr(spec, f)
    )
    raise ValueError(
        f"cannot replay this {spec.model_type} model: its config and its MoE blocks (experts next to a router weight) "
        f"disagree: {diff}; MoE-like modules: {_moe_candidates(model) or 'none'}"
    )


# --- interception -------------------------------------------------------------------------------------------------


def _topk_call(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, int, int, bool]:
    """(input, k, dim, largest) of a ``torch.topk`` / ``Tensor.topk`` call."""
    names = ("input", "k", "dim", "largest")
    defaults = {"dim": -1, "largest": True}
    values = {n: (args[i] if i < len(args) else kwargs.get(n, defaults.get(n))) for i, n in enumerate(names)}
    if values["input"] is None:
        values["input"] = kwargs.get("self")
    return values["input"], int(values["k"]), int(values["dim"]), bool(values["largest"])


class _SelectionMode(TorchFunctionMode):
    """Active during one block's routing code; swaps the first expert-selection top-k for ``select``'s answer."""

    def __init__(self, block: MoEBlock, spec: MoESpec, select: SelectFn) -> None:
        super().__init__()
        self.block, self.spec, self.select = block, spec, select
        self.selections = 0
        # masked score tensors seen in this call -> (masked, unmasked): group limits hide experts with -inf/0
        self.unmasked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _is_selection(self, scores: Any, k: int, dim: int, largest: bool) -> bool:
        return (
            isinstance(scores, torch.Tensor)
            and scores.ndim == 2  # [tokens, E]: a per-group top-k over [tokens, 1, E] (n_group = 1) is not it
            and scores.shape[-1] == self.spec.num_experts
            and k == self.spec.top_k
            and dim in (-1, 1)
            and largest
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.selections:
            return result
        if func in _MASK_FUNCS:
            self._remember_mask(func, args, result)
            return result
        if func not in _TOPK_FUNCS:
            return result
        scores, k, dim, largest = _topk_call(args, kwargs)
        if not self._is_selection(scores, k, dim, largest):
            return result
        self.selections += 1
        masked = self.unmasked.get(id(scores))
        unmasked = masked[1] if masked is not None and masked[0] is scores else scores
        return self.select(self.block, scores, result, unmasked)

    def _remember_mask(self, func, args, result) -> None:
        if not isinstance(result, torch.Tensor) or result.ndim < 2 or result.shape[-1] != self.spec.num_experts:
            return
        source = args[1] if func is torch.where and len(args) == 3 else (args[0] if func is not torch.where else None)
        if isinstance(source, torch.Tensor) and source.shape == result.shape and source.dtype == result.dtype:
            root = self.unmasked.get(id(source))
            self.unmasked[id(result)] = (result, root[1] if root is not None and root[0] is source else source)


@contextlib.contextmanager
def intercept_selection(blocks: Sequence[MoEBlock], spec: MoESpec, select: SelectFn) -> Iterator[None]:
    """While open, every forward of each block (first pass or checkpoint recompute) routes through ``select``."""
    patched: list[nn.Module] = []
    try:
        for block in blocks:
            for module in (block.module, *block.experts):
                if "forward" in vars(module):
                    raise ValueError(f"{block.name} is already under replay or record; nest neither")
            active: list[_SelectionMode] = []  # the mode of the block forward now running, if any
            block.module.forward = _wrap_block(block, spec, select, block.module.forward, active)
            patched.append(block.module)
            for experts in block.experts:
                experts.forward = _wrap_experts(experts.forward, active)
                patched.append(experts)
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
        if active and _mode_is_innermost(active[-1]):
            with _suspended_modes():
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    return forward
