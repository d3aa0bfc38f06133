"""The routed-experts contract: which experts each token went through, per MoE layer.

Every component of R3 exchanges routes through :class:`RoutedExperts`, so the
format is strict and compact:

* ids are stored as ``uint8`` when ``num_experts <= 255`` and ``uint16``
  otherwise; the dtype's maximum is the *sentinel* ("no route for this slot":
  the final sampled token, padding, a missing capture);
* only MoE layers take space: ``moe_layers[i]`` is the model layer of row ``i``,
  so DeepSeek-V3's dense first layers cost nothing;
* ``start`` is the absolute token position of row 0, so multi-turn slices
  concatenate back into one sequence-aligned object.

The binary form is a fixed little-endian header, the MoE layer table and the raw
ids, protected by a CRC32 over all three (format version 2; version 1, whose CRC
covered only the table and ids, still decodes). It is never pickle: it crosses
process and file boundaries, so every malformed input is a ``ValueError`` and the
declared sizes are checked against the bytes actually there before anything is
allocated.

Negative ids: only ``-1`` (the signed form of "no route", as ``to_torch`` and
``to_int32`` write it) is accepted from signed inputs; any other negative value,
and any unsigned value that is not an id, is an error rather than a missing route.
"""

from __future__ import annotations

import base64
import binascii
import operator
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

MAGIC = b"R3RE"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the CRC covers the layer table and ids only; 2: the header too
# magic, version, dtype code, reserved, num_tokens, num_layers, top_k, num_experts, start, crc32
_HEADER = struct.Struct("<4sHBBIHHIQI")
HEADER_BYTES = _HEADER.size
_CRC_OFFSET = HEADER_BYTES - 4  # the CRC is the header's last field; v2 covers every byte before it
_DTYPE_CODES = {1: np.dtype(np.uint8), 2: np.dtype("<u2")}
MAX_EXPERTS = int(np.iinfo(np.uint16).max)  # the uint16 sentinel itself is not an id
MAX_LAYER_INDEX = int(np.iinfo(np.uint16).max)  # the layer table is uint16
MAX_TOKENS = int(np.iinfo(np.uint32).max)  # the header's token count is uint32
MAX_START = int(np.iinfo(np.int64).max)  # rollout files and trainer tensors hold positions as int64
MISSING = -1  # "no route" in every signed form (to_torch, to_int32, SGLang's wire as r3 serve writes it)
# SGLang's meta_info["routed_experts_dtype"] (newer releases, server env SGLANG_ROUTED_EXPERTS_DTYPE); absent = int32
SGLANG_WIRE_DTYPES = {"int32": np.dtype("<i4"), "uint16": np.dtype("<u2"), "uint8": np.dtype(np.uint8)}


def compact_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``num_experts`` ids plus the sentinel."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    return _DTYPE_CODES[1] if num_experts <= 255 else _DTYPE_CODES[2]


def sentinel_for(num_experts: int) -> int:
    """The "no route" marker for a model with ``num_experts`` experts."""
    return int(np.iinfo(compact_dtype(num_experts)).max)


def _as_int_array(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch.Tensor without importing torch here
        ids = ids.detach().cpu().numpy()
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError, OverflowError) as exc:  # ragged lists, objects numpy cannot hold
        raise ValueError(f"routed expert ids must be an integer array: {exc}") from None
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"routed expert ids must be integers, got dtype {arr.dtype}")
    return arr


def _index(value: Any, what: str, high: int) -> int:
    """A non-negative integer up to ``high``: anything with ``__index__`` but a bool; a whole float is refused too."""
    try:
        out = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        out = None
    if out is None or not 0 <= out <= high:
        raise ValueError(f"{what} must be an integer in [0, {high}], got {value!r}")
    return out


def _to_compact(arr: np.ndarray, num_experts: int, dtype: np.dtype) -> np.ndarray:
    """Ids in any integer dtype -> the compact dtype; ``-1`` (signed inputs only) becomes the sentinel.

    Every other value outside ``[0, num_experts)`` is an error: a negative id (-5, -2**31), or
    an unsigned value such as a wrapped uint64 ``-1``, is corruption, not a missing route.
    """
    if arr.dtype.kind == "u":
        missing = None
        bad = arr >= num_experts
    else:
        missing = arr == MISSING
        if (arr < MISSING).any():
            raise ValueError(
                f"expert id {int(arr.min())} is negative; only {MISSING} marks a missing route in signed ids"
            )
        bad = arr >= num_experts
    if bad.any():
        raise ValueError(f"expert id {int(arr[bad].max())} out of range for num_experts={num_experts}")
    out = arr.astype(dtype)
    if missing is not None and missing.any():
        out[missing] = np.iinfo(dtype).max
    return out


@dataclass(eq=False)
class RoutedExperts:
    """Routes of one sequence: ``ids[t, l, k]`` is the k-th expert of token ``start + t`` in MoE layer ``moe_layers[l]``."""

    ids: np.ndarray
    num_experts: int
    moe_layers: tuple[int, ...]
    start: int

    def __init__(
        self,
        ids: Any,
        num_experts: int,
        moe_layers: Sequence[int] | None = None,
        start: int = 0,
        *,
        validate: bool = True,
    ) -> None:
        """``validate=False`` is for ids an engine just took from a top-k in the compact dtype: the
        per-row checks cost about a millisecond a sequence, which lands on the host between decode steps."""
        arr = _as_int_array(ids)
        if arr.ndim != 3:
            raise ValueError(f"routed expert ids must have shape [num_tokens, num_moe_layers, top_k], got {arr.shape}")
        num_experts = _index(num_experts, "num_experts", MAX_EXPERTS)
        dtype = compact_dtype(num_experts)
        if arr.dtype != dtype:
            arr = _to_compact(arr, num_experts, dtype)
        self.ids = np.ascontiguousarray(arr)
        self.num_experts = num_experts
        if moe_layers is None:
            self.moe_layers = tuple(range(arr.shape[1]))
        else:
            if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Iterable):
                raise ValueError(f"moe_layers must be a sequence of layer indices, got {moe_layers!r}")
            self.moe_layers = tuple(_index(x, "each of moe_layers", MAX_LAYER_INDEX) for x in moe_layers)
        self.start = _index(start, "start", MAX_START)
        if validate:
            self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def end(self) -> int:
        """Absolute position one past the last row."""
        return self.start + self.num_tokens

    @property
    def sentinel(self) -> int:
        return int(np.iinfo(self.ids.dtype).max)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes)

    def row_mask(self) -> np.ndarray:
        """``[T, L]`` booleans: True where the (token, layer) row holds a route."""
        return self.ids[..., 0] != self.sentinel

    # ------------------------------------------------------------- validation
    def validate(self) -> "RoutedExperts":
        """Raise ``ValueError`` naming the first broken invariant."""
        if self.ids.dtype != compact_dtype(self.num_experts):
            raise ValueError(f"ids dtype {self.ids.dtype} does not match num_experts={self.num_experts}")
        self._check_header_fields()
        if any(b <= a for a, b in zip(self.moe_layers, self.moe_layers[1:])) or any(x < 0 for x in self.moe_layers):
            raise ValueError(f"moe_layers must be non-negative and strictly increasing, got {self.moe_layers}")
        if self.num_layers < 1:
            raise ValueError("routes need at least one MoE layer")
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.ids.size == 0:
            return self
        is_sentinel = self.ids == self.sentinel
        partial = is_sentinel.any(-1) & ~is_sentinel.all(-1)
        if partial.any():
            t, l = map(int, np.argwhere(partial)[0])
            raise ValueError(f"row (token {self.start + t}, layer {self.moe_layers[l]}) is partly missing: {self.ids[t, l].tolist()}")
        valid = ~is_sentinel
        out_of_range = valid & (self.ids >= self.num_experts)
        if out_of_range.any():
            t, l, k = map(int, np.argwhere(out_of_range)[0])
            raise ValueError(
                f"expert id {int(self.ids[t, l, k])} >= num_experts={self.num_experts} "
                f"at token {self.start + t}, layer {self.moe_layers[l]}"
            )
        if self.top_k > 1:
            srt = np.sort(self.ids, axis=-1)
            dup = ((srt[..., 1:] == srt[..., :-1]) & valid[..., 1:]).any(-1)
            if dup.any():
                t, l = map(int, np.argwhere(dup)[0])
                raise ValueError(
                    f"duplicate expert ids {self.ids[t, l].tolist()} at token {self.start + t}, layer {self.moe_layers[l]}"
                )
        return self

    def _same_model(self, other: "RoutedExperts", what: str) -> None:
        if (other.num_experts, other.moe_layers, other.top_k) != (self.num_experts, self.moe_layers, self.top_k):
            raise ValueError(
                f"cannot {what} routes of different models: "
                f"(num_experts, moe_layers, top_k) = {(self.num_experts, self.moe_layers, self.top_k)} "
                f"vs {(other.num_experts, other.moe_layers, other.top_k)}"
            )

    # ------------------------------------------------------------- operations
    def slice(self, begin: int, end: int | None = None) -> "RoutedExperts":
        """Rows for absolute token positions ``[begin, end)``."""
        end = self.end if end is None else end
        if not self.start <= begin <= end <= self.end:
            raise ValueError(f"slice [{begin}, {end}) is outside the routes' positions [{self.start}, {self.end})")
        return RoutedExperts(
            self.ids[begin - self.start : end - self.start].copy(), self.num_experts, self.moe_layers, begin
        )

    @classmethod
    def concat(cls, parts: Iterable["RoutedExperts"]) -> "RoutedExperts":
        """Join turns of one sequence; each part must start where the previous one ended."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one RoutedExperts")
        first = parts[0]
        for prev, nxt in zip(parts, parts[1:]):
            first._same_model(nxt, "concatenate")
            if nxt.start != prev.end:
                kind = "gap" if nxt.start > prev.end else "overlap"
                raise ValueError(
                    f"turns are not contiguous ({kind}): one ends at position {prev.end}, the next starts at {nxt.start}"
                )
        ids = np.concatenate([p.ids for p in parts], axis=0)
        return cls(ids, first.num_experts, first.moe_layers, first.start)

    def to_torch(self, device: Any = None) -> "Any":
        """int64 tensor ``[T, L, K]`` with ``-1`` for missing rows (the trainer_bridge convention)."""
        import torch

        wide = torch.from_numpy(self._signed(np.int64))
        return wide.to(device) if device is not None else wide

    def to_int32(self) -> np.ndarray:
        """int32 ``[T, L, K]`` with ``-1`` for missing rows."""
        return self._signed(np.int32)

    def _signed(self, dtype: Any) -> np.ndarray:
        """The ids widened to a signed ``dtype`` (a copy), the sentinel becoming ``-1``."""
        wide = self.ids.astype(dtype)
        wide[self.ids == self.sentinel] = -1
        return wide

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutedExperts):
            return NotImplemented
        return (
            self.num_experts == other.num_experts
            and self.moe_layers == other.moe_layers
            and self.start == other.start
            and self.ids.shape == other.ids.shape
            and bool(np.array_equal(self.ids, other.ids))
        )

    def __repr__(self) -> str:
        return (
            f"RoutedExperts(tokens=[{self.start}, {self.end}), layers={self.num_layers}, top_k={self.top_k}, "
            f"num_experts={self.num_experts}, dtype={self.ids.dtype})"
        )

    # ------------------------------------------------------------ binary form
    def encode(self) -> bytes:
        """Versioned header + MoE layer table (uint16) + raw ids (little-endian); CRC32 over all of it."""
        self._check_header_fields()
        layers = np.asarray(self.moe_layers, dtype="<u2").tobytes()
        payload = layers + self.ids.astype(self.ids.dtype.newbyteorder("<"), copy=False).tobytes()
        code = 1 if self.ids.dtype.itemsize == 1 else 2
        fields = (MAGIC, FORMAT_VERSION, code, 0, self.num_tokens, self.num_layers, self.top_k, self.num_experts, self.start)
        head = _HEADER.pack(*fields, 0)[:_CRC_OFFSET]
        return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload

    def _check_header_fields(self) -> None:
        """The cheap part of ``validate``: what the header and layer table must hold (before ``struct.pack``)."""
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries but ids have {self.num_layers} layers")
        if self.num_tokens > MAX_TOKENS or not 0 <= self.start <= MAX_START:
            raise ValueError(f"start={self.start} and {self.num_tokens} tokens exceed what the format holds")

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "RoutedExperts":
        """Parse ``encode``'s bytes (versions 1 and 2); every malformed input is a ``ValueError`` naming the problem.

        Sizes the header declares are checked against the actual length before any array is
        built, so a lying header costs no memory beyond the input itself.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"routed experts payload must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < HEADER_BYTES:
            raise ValueError(f"routed experts payload truncated: {len(data)} bytes, header alone needs {HEADER_BYTES}")
        magic, version, code, reserved, tokens, layers, top_k, num_experts, start, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"bad magic {magic!r}: not a routed experts payload (expected {MAGIC!r})")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported routed experts format version {version} (this build reads {READABLE_VERSIONS})")
        if code not in _DTYPE_CODES:
            raise ValueError(f"unknown id dtype code {code}")
        dtype = _DTYPE_CODES[code]
        expected = HEADER_BYTES + 2 * layers + tokens * layers * top_k * dtype.itemsize
        if len(data) != expected:
            what = "truncated" if len(data) < expected else "has trailing bytes"
            raise ValueError(
                f"routed experts payload {what}: {len(data)} bytes, shape "
                f"[{tokens}, {layers}, {top_k}] needs {expected}"
            )
        payload = data[HEADER_BYTES:]
        covered = zlib.crc32(payload, zlib.crc32(data[:_CRC_OFFSET])) if version >= 2 else zlib.crc32(payload)
        if covered != crc:
            raise ValueError("routed experts payload is corrupt: CRC32 mismatch")
        # Past the CRC a field can still be wrong (a v1 header, or a writer's bug): name it.
        if version >= 2 and reserved != 0:
            raise ValueError(f"routed experts header has reserved byte {reserved}, expected 0")
        if not 1 <= num_experts <= MAX_EXPERTS or dtype != compact_dtype(num_experts):
            raise ValueError(f"dtype code {code} does not match num_experts={num_experts}")
        if start > MAX_START:
            raise ValueError(f"routed experts start {start} exceeds {MAX_START}")
        moe_layers = np.frombuffer(payload[: 2 * layers], dtype="<u2").tolist()
        ids = np.frombuffer(payload[2 * layers :], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(tokens, layers, top_k)
        return cls(ids, num_experts, moe_layers, start)

    def to_base64(self) -> str:
        return base64.b64encode(self.encode()).decode("ascii")

    @classmethod
    def from_base64(cls, text: str | bytes) -> "RoutedExperts":
        return cls.decode(_b64decode(text, "routed experts base64"))

    # ------------------------------------------------------- other engines
    @classmethod
    def from_sglang(
        cls,
        b64: str,
        *,
        num_experts: int,
        num_hidden_layers: int,
        top_k: int,
        moe_layers: Sequence[int] | None = None,
        start: int = 0,
        num_tokens: int | None = None,
        wire_dtype: str = "int32",
    ) -> "RoutedExperts":
        """Decode SGLang's ``meta_info["routed_experts"]``.

        SGLang (0.5.x, ``routed_experts_capturer`` + detokenizer) sends base64 of
        little-endian int32, flat, logical shape ``[T, num_hidden_layers, top_k]``
        with dense layers written as zeros. Newer releases can send ``uint16`` or
        ``uint8`` instead (server env ``SGLANG_ROUTED_EXPERTS_DTYPE``), named by
        ``meta_info["routed_experts_dtype"]``: pass it as ``wire_dtype``. ``start``
        is the request's ``routed_experts_start_len``.
        """
        if wire_dtype not in SGLANG_WIRE_DTYPES:
            raise ValueError(f"unknown SGLang routed_experts_dtype {wire_dtype!r}; known: {sorted(SGLANG_WIRE_DTYPES)}")
        dtype = SGLANG_WIRE_DTYPES[wire_dtype]
        num_hidden_layers = _index(num_hidden_layers, "num_hidden_layers", MAX_LAYER_INDEX + 1)
        top_k = _index(top_k, "top_k", MAX_EXPERTS)
        if num_hidden_layers < 1 or top_k < 1:
            raise ValueError(f"num_hidden_layers and top_k must be >= 1, got {num_hidden_layers} and {top_k}")
        raw = _b64decode(b64, "SGLang routed_experts")
        row = num_hidden_layers * top_k * dtype.itemsize
        if len(raw) % row:
            raise ValueError(
                f"SGLang routed_experts has {len(raw)} bytes, not a multiple of "
                f"num_hidden_layers({num_hidden_layers}) * top_k({top_k}) * {dtype.itemsize} ({wire_dtype})"
            )
        flat = np.frombuffer(raw, dtype=dtype).reshape(-1, num_hidden_layers, top_k)
        if num_tokens is not None and flat.shape[0] != num_tokens:
            raise ValueError(f"SGLang routed_experts has {flat.shape[0]} rows, expected {num_tokens}")
        routes = cls._from_full_layers(flat, num_experts, num_hidden_layers, moe_layers, start, "SGLang")
        dense = [i for i in range(num_hidden_layers) if i not in routes.moe_layers]
        if dense and flat[:, dense, :].any():  # SGLang writes zeros there: this layer table is not the server's
            raise ValueError(f"SGLang routed_experts has non-zero ids in layers {dense}, which moe_layers says are dense")
        return routes

    @classmethod
    def from_vllm(
        cls,
        array: Any,
        *,
        num_experts: int,
        moe_layers: Sequence[int] | None = None,
        start: int = 0,
    ) -> "RoutedExperts":
        """Convert vLLM's ``routed_experts`` array ``[seq_len-1, num_hidden_layers, top_k]``."""
        arr = _as_int_array(array)
        if arr.ndim != 3:
            raise ValueError(f"vLLM routed_experts must be [tokens, num_hidden_layers, top_k], got shape {arr.shape}")
        return cls._from_full_layers(arr, num_experts, arr.shape[1], moe_layers, start, "vLLM")

    @classmethod
    def _from_full_layers(cls, arr, num_experts, num_hidden_layers, moe_layers, start, source) -> "RoutedExperts":
        if moe_layers is not None and (isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Iterable)):
            raise ValueError(f"moe_layers must be a sequence of layer indices, got {moe_layers!r}")
        layers = list(range(num_hidden_layers)) if moe_layers is None else list(moe_layers)
        if any(isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) for x in layers):
            raise ValueError(f"moe_layers must be layer indices (integers), got {layers}")
        if layers and (min(layers) < 0 or max(layers) >= num_hidden_layers):
            raise ValueError(f"moe_layers {layers} outside the {source} array's {num_hidden_layers} layers")
        return cls(arr[:, layers, :], num_experts, layers, start)

    def to_sglang(self, num_hidden_layers: int) -> str:
        """SGLang's wire form: base64 int32 ``[T, num_hidden_layers, top_k]``, dense layers as zeros."""
        if self.moe_layers and max(self.moe_layers) >= num_hidden_layers:
            raise ValueError(f"moe_layers {list(self.moe_layers)} do not fit a model of {num_hidden_layers} layers")
        full = np.zeros((self.num_tokens, num_hidden_layers, self.top_k), dtype="<i4")
        full[:, list(self.moe_layers), :] = self.to_int32()
        return base64.b64encode(full.tobytes()).decode("ascii")


def _b64decode(text: Any, what: str) -> bytes:
    """Strict base64 (no stray characters); anything else is a ``ValueError`` naming ``what``."""
    if not isinstance(text, (str, bytes)):
        raise ValueError(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64: {exc}") from None
