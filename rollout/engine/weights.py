"""Checkpoint parameter names -> the engine's fused tensors: one table for loading and for updates.

The engine keeps q/k/v in one ``qkv`` matrix, gate and up in one ``gate_up``, and every
expert of a layer stacked in ``[E, 2I, H]`` / ``[E, H, I]`` tensors. Callers speak in
transformers' names, in either of the two spellings that exist:

* the checkpoint (hub) spelling, one tensor per expert
  (``model.layers.3.mlp.experts.5.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.5.w1.weight``),
  which ``save_pretrained`` writes and the loader reads;
* transformers 5's in-memory spelling, what a trainer's ``model.state_dict()`` holds: experts
  fused as ``model.layers.3.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``...experts.down_proj``
  ``[E, H, I]`` (Mixtral's block renamed ``mlp``).

Each name maps to a :class:`Slot`, a view of one engine tensor. Slots are described by the
*parts* they cover (one expert's gate half, the q rows of ``qkv``, ...), so the same table
answers "is this checkpoint complete?" (the loader) and "do two names in one update write
the same memory?" (``update_weights``). Writes always ``copy_`` into the existing storage:
tensors are never rebound, so captured CUDA graphs keep reading the right addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Callable

import torch

from rollout.engine.models.arch import ModelArch

# Floating dtypes a caller may send; values are cast to the engine's dtype on copy.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FUSED_BLOCK = "mlp"  # transformers 5 keeps every family's MoE block at model.layers.{i}.mlp
_ALL = ()  # index of a whole tensor

Part = tuple  # (target, *sub-index): the smallest region one name can write


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, H]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # [E, H]; None on dense layers
    gate_up: torch.Tensor  # MoE [E, 2I, H] or dense [2I, H]
    down: torch.Tensor  # MoE [E, H, I] or dense [H, I]
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class ModelWeights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the embed tensor itself when the embeddings are tied
    layers: list[LayerWeights]


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lives: ``tensors[target][index]``, of ``shape``, covering ``parts``."""

    target: str
    index: tuple
    shape: tuple[int, ...]
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Write:
    """One checked tensor and the slot it goes to."""

    name: str
    slot: Slot
    tensor: torch.Tensor


class WeightLayout:
    """Every accepted name of one model, and the engine tensors they write."""

    def __init__(self, arch: ModelArch, tied_embeddings: bool) -> None:
        self.arch = arch
        self.tied = tied_embeddings
        self.shapes: dict[str, tuple[int, ...]] = {}  # target -> full shape
        self.slots: dict[str, Slot] = {}
        self._part_name: dict[Part, str] = {}  # a checkpoint name that writes each part, for messages
        self._build()

    # ------------------------------------------------------------- building
    def _target(self, key: str, *shape: int) -> str:
        self.shapes[key] = tuple(shape)
        return key

    def _add(self, name: str, target: str, index: tuple, shape: tuple[int, ...], parts: tuple[Part, ...]) -> None:
        self.slots[name] = Slot(target, index, tuple(shape), parts)
        for part in parts:
            self._part_name.setdefault(part, name)

    def _whole(self, name: str, target: str) -> None:
        self._add(name, target, _ALL, self.shapes[target], ((target,),))

    def _rows(self, names: list[str], target: str, sizes: list[int], lead: tuple = ()) -> None:
        """``names[j]`` writes the j-th block of rows (``sizes[j]`` long) of ``target[lead]``."""
        begin = 0
        shape = self.shapes[target][len(lead) :]
        for j, (name, size) in enumerate(zip(names, sizes)):
            self._add(name, target, lead + (slice(begin, begin + size),), (size, *shape[1:]), ((target, *lead, j),))
            begin += size

    def _build(self) -> None:
        a = self.arch
        H, V = a.hidden_size, a.vocab_size
        self._whole("model.embed_tokens.weight", self._target("embed", V, H))
        self._whole("model.norm.weight", self._target("final_norm", H))
        if self.tied:
            self._add("lm_head.weight", "embed", _ALL, (V, H), (("embed",),))
        else:
            self._whole("lm_head.weight", self._target("lm_head", V, H))
        for i in range(a.num_layers):
            self._build_layer(i)

    def _build_layer(self, i: int) -> None:
        a = self.arch
        H, p, t = a.hidden_size, f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        self._whole(p + "input_layernorm.weight", self._target(t + "input_norm", H))
        self._whole(p + "post_attention_layernorm.weight", self._target(t + "post_norm", H))
        sizes = [a.q_size, a.kv_size, a.kv_size]
        self._rows([attn + f"{x}_proj.weight" for x in "qkv"], self._target(t + "qkv", sum(sizes), H), sizes)
        if a.qkv_bias:
            bias = self._target(t + "qkv_bias", sum(sizes))
            begin = 0
            for j, (x, size) in enumerate(zip("qkv", sizes)):
                self._add(attn + f"{x}_proj.bias", bias, (slice(begin, begin + size),), (size,), ((bias, j),))
                begin += size
        self._whole(attn + "o_proj.weight", self._target(t + "o", H, a.q_size))
        if a.qk_norm:
            self._whole(attn + "q_norm.weight", self._target(t + "q_norm", a.head_dim))
            self._whole(attn + "k_norm.weight", self._target(t + "k_norm", a.head_dim))
        if i in a.moe_layers:
            self._build_moe(i)
        else:
            inter = a.dense_intermediate_size
            gate_up = self._target(t + "gate_up", 2 * inter, H)
            self._rows([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], gate_up, [inter, inter])
            self._whole(p + "mlp.down_proj.weight", self._target(t + "down", H, inter))

    def _build_moe(self, i: int) -> None:
        a = self.arch
        H, E, inter, n = a.hidden_size, a.num_experts, a.moe_intermediate_size, a.expert_names
        p, t = f"model.layers.{i}.", f"layers.{i}."
        block, fused = p + n.block + ".", p + FUSED_BLOCK + "."
        router = self._target(t + "router", E, H)
        self._whole(block + "gate.weight", router)
        if fused != block:
            self._whole(fused + "gate.weight", router)
        gate_up = self._target(t + "gate_up", E, 2 * inter, H)
        down = self._target(t + "down", E, H, inter)
        for e in range(E):  # checkpoint spelling first: messages about missing parts name these
            expert = f"{block}experts.{e}."
            self._rows([expert + f"{n.gate}.weight", expert + f"{n.up}.weight"], gate_up, [inter, inter], lead=(e,))
            self._add(expert + f"{n.down}.weight", down, (e,), (H, inter), ((down, e),))
        self._add(fused + "experts.gate_up_proj", gate_up, _ALL, (E, 2 * inter, H),
                  tuple((gate_up, e, j) for e in range(E) for j in range(2)))
        self._add(fused + "experts.down_proj", down, _ALL, (E, H, inter), tuple((down, e) for e in range(E)))
        shared = a.shared_expert_intermediate_size
        if shared:
            s = p + "mlp.shared_expert."
            sgu = self._target(t + "shared_gate_up", 2 * shared, H)
            self._rows([s + "gate_proj.weight", s + "up_proj.weight"], sgu, [shared, shared])
            self._whole(s + "down_proj.weight", self._target(t + "shared_down", H, shared))
            self._whole(p + "mlp.shared_expert_gate.weight", self._target(t + "shared_gate", 1, H))

    # ------------------------------------------------------------ tensors
    def allocate(self, device: torch.device, dtype: torch.dtype) -> ModelWeights:
        """Uninitialised engine tensors of this layout (the loader fills every part)."""
        made = {key: torch.empty(shape, device=device, dtype=dtype) for key, shape in self.shapes.items()}
        layers = []
        for i in range(self.arch.num_layers):
            t = f"layers.{i}."
            layers.append(LayerWeights(**{f.name: made.get(t + f.name) for f in fields(LayerWeights)}))
        return ModelWeights(
            embed=made["embed"], final_norm=made["final_norm"], lm_head=made["embed" if self.tied else "lm_head"],
            layers=layers,
        )

    # ------------------------------------------------------------ checking
    def check(self, name: object, tensor: object) -> Write:
        """One named tensor against the layout; every problem is a ``ValueError`` naming the tensor."""
        if not isinstance(name, str):
            raise ValueError(f"weight names must be strings, got {type(name).__name__} {name!r}")
        slot = self.slots.get(name)
        if slot is None:
            raise ValueError(
                f"{name!r} is not a parameter of this {self.arch.model_type} model "
                f"(names are transformers', e.g. 'model.layers.0.self_attn.q_proj.weight')"
            )
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.is_meta:
            raise ValueError(f"{name}: expected a dense tensor with data, got layout {tensor.layout} on {tensor.device}")
        if tensor.dtype not in WEIGHT_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
            raise ValueError(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')} is not one of {allowed}")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: shape {list(tensor.shape)} does not match the model's {list(slot.shape)}")
        return Write(name, slot, tensor)

    def plan(self, weights: object, check_finite: bool = True) -> list[Write]:
        """Check a whole update before anything is written: names, shapes, dtypes, values, overlaps.

        ``weights`` is a mapping or an iterable of ``(name, tensor)`` pairs. Two names that
        write the same part (a fused tensor and one of its experts; a tied ``lm_head`` and the
        embedding) are refused unless they are the very same tensor (a tied model's
        ``state_dict`` lists it under both names), which is then written once.
        """
        writes: list[Write] = []
        owner: dict[Part, Write] = {}
        for name, tensor in _named_items(weights):
            write = self.check(name, tensor)
            if check_finite and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}: holds NaN or infinite values")
            clash = next((owner[part] for part in write.slot.parts if part in owner), None)
            if clash is not None:
                if clash.slot == write.slot and _same_tensor(clash.tensor, tensor):
                    continue
                raise ValueError(f"{name} and {clash.name} write the same engine weights ({write.slot.target}): pass one of them")
            for part in write.slot.parts:
                owner[part] = write
            writes.append(write)
        return writes

    def missing(self, written: Iterable[Slot]) -> str | None:
        """A checkpoint name whose part no written slot covered (None when they cover every part)."""
        covered = {part for slot in written for part in slot.parts}
        return next((name for part, name in self._part_name.items() if part not in covered), None)

    def to_checkpoint(self, writes: Iterable[Write]) -> dict[str, torch.Tensor]:
        """The checked tensors under checkpoint names (one per expert), what other engines' loaders read.

        A fused or aliased name covers whole engine tensors, so its checkpoint parts are views of it.
        """
        out: dict[str, torch.Tensor] = {}
        for w in writes:
            names = list(dict.fromkeys(self._part_name[part] for part in w.slot.parts))
            if names == [w.name]:
                out[w.name] = w.tensor
                continue
            assert w.slot.index == _ALL, f"{w.name}: only whole-tensor names have another spelling"
            for name in names:
                out[name] = w.tensor[self.slots[name].index]
        return out

    # ------------------------------------------------------------- writing
    @staticmethod
    def apply(writes: Iterable[Write], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy each checked tensor into its slot, in place (device transfer and dtype cast included)."""
        with torch.no_grad():
            for w in writes:
                tensors[w.slot.target][w.slot.index].copy_(w.tensor)


def engine_tensors(weights: ModelWeights) -> dict[str, torch.Tensor]:
    """Target key -> engine tensor; a tied ``lm_head`` is the ``embed`` entry."""
    out = {"embed": weights.embed, "final_norm": weights.final_norm}
    if weights.lm_head is not weights.embed:
        out["lm_head"] = weights.lm_head
    for i, layer in enumerate(weights.layers):
        for f in fields(LayerWeights):
            value = getattr(layer, f.name)
            if value is not None:
                out[f"layers.{i}.{f.name}"] = value
    return out


def map_tensors(weights: ModelWeights, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Replace every engine tensor by ``fn(target key, tensor)`` (e.g. a host copy), keeping tied ones tied."""
    tied = weights.lm_head is weights.embed
    weights.embed = fn("embed", weights.embed)
    weights.final_norm = fn("final_norm", weights.final_norm)
    weights.lm_head = weights.embed if tied else fn("lm_head", weights.lm_head)
    for i, layer in enumerate(weights.layers):
        for f in fields(LayerWeights):
            value = getattr(layer, f.name)
            if value is not None:
                setattr(layer, f.name, fn(f"layers.{i}.{f.name}", value))


def weight_bytes(weights: ModelWeights) -> int:
    return sum(t.numel() * t.element_size() for t in engine_tensors(weights).values())


def _named_items(weights: object) -> Iterable[tuple[object, object]]:
    if isinstance(weights, Mapping):
        yield from weights.items()
        return
    if isinstance(weights, (str, bytes, torch.Tensor)) or not isinstance(weights, Iterable):
        raise ValueError(f"weights must be a mapping or an iterable of (name, tensor) pairs, got {type(weights).__name__}")
    for item in weights:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"weights must be (name, tensor) pairs, got an item of type {type(item).__name__}")
        yield item[0], item[1]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )
