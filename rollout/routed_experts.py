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
ids, protected by a CRC32. It is never pickle: it crosses process and file
boundaries.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

MAGIC = b"R3RE"
FORMAT_VERSION = 1
# magic, version, dtype code, reserved, num_tokens, num_layers, top_k, num_experts, start, crc32
_HEADER = struct.Struct("<4sHBBIHHIQI")
HEADER_BYTES = _HEADER.size
_DTYPE_CODES = {1: np.dtype(np.uint8), 2: np.dtype("<u2")}
MAX_EXPERTS = int(np.iinfo(np.uint16).max)  # the uint16 sentinel itself is not an id


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
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"routed expert ids must be integers, got dtype {arr.dtype}")
    return arr


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
        dtype = compact_dtype(int(num_experts))
        sentinel = int(np.iinfo(dtype).max)
        if arr.dtype != dtype:
            wide = arr.astype(np.int64, copy=False)
            too_big = wide >= int(num_experts)
            if (wide < 0).any() or too_big.any():
                bad = wide[too_big]
                if bad.size:
                    raise ValueError(f"expert id {int(bad.max())} out of range for num_experts={num_experts}")
                wide = np.where(wide < 0, sentinel, wide)
            arr = wide.astype(dtype)
        self.ids = np.ascontiguousarray(arr)
        self.num_experts = int(num_experts)
        self.moe_layers = tuple(range(arr.shape[1])) if moe_layers is None else tuple(int(x) for x in moe_layers)
        self.start = int(start)
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
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries but ids have {self.num_layers} layers")
        if any(b <= a for a, b in zip(self.moe_layers, self.moe_layers[1:])) or any(x < 0 for x in self.moe_layers):
            raise ValueError(f"moe_layers must be non-negative and strictly increasing, got {self.moe_layers}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
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
        """Versioned header + MoE layer table (uint16) + raw ids (little-endian)."""
        layers = np.asarray(self.moe_layers, dtype="<u2").tobytes()
        payload = layers + self.ids.astype(self.ids.dtype.newbyteorder("<"), copy=False).tobytes()
        code = 1 if self.ids.dtype.itemsize == 1 else 2
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, code, 0, self.num_tokens, self.num_layers, self.top_k,
            self.num_experts, self.start, zlib.crc32(payload),
        )
        return header + payload

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "RoutedExperts":
        data = bytes(data)
        if len(data) < HEADER_BYTES:
            raise ValueError(f"routed experts payload truncated: {len(data)} bytes, header alone needs {HEADER_BYTES}")
        magic, version, code, _, tokens, layers, top_k, num_experts, start, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"bad magic {magic!r}: not a routed experts payload (expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported routed experts format version {version} (this build reads {FORMAT_VERSION})")
        if code not in _DTYPE_CODES:
            raise ValueError(f"unknown id dtype code {code}")
        dtype = _DTYPE_CODES[code]
        if dtype != compact_dtype(num_experts):
            raise ValueError(f"dtype code {code} does not match num_experts={num_experts}")
        expected = HEADER_BYTES + 2 * layers + tokens * layers * top_k * dtype.itemsize
        if len(data) != expected:
            what = "truncated" if len(data) < expected else "has trailing bytes"
            raise ValueError(
                f"routed experts payload {what}: {len(data)} bytes, shape "
                f"[{tokens}, {layers}, {top_k}] needs {expected}"
            )
        payload = data[HEADER_BYTES:]
        if zlib.crc32(payload) != crc:
            raise ValueError("routed experts payload is corrupt: CRC32 mismatch")
        moe_layers = np.frombuffer(payload[: 2 * layers], dtype="<u2").tolist()
        ids = np.frombuffer(payload[2 * layers :], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(tokens, layers, top_k)
        return cls(ids, num_experts, moe_layers, start)

    def to_base64(self) -> str:
        return base64.b64encode(self.encode()).decode("ascii")

    @classmethod
    def from_base64(cls, text: str) -> "RoutedExperts":
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"routed experts base64 is malformed: {exc}") from None
        return cls.decode(raw)

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
    ) -> "RoutedExperts":
        """Decode SGLang's ``meta_info["routed_experts"]``.

        SGLang (0.5.x, ``routed_experts_capturer`` + detokenizer) sends base64 of
        little-endian int32, flat, logical shape ``[T, num_hidden_layers, top_k]``
        with dense layers written as zeros. ``start`` is the request's
        ``routed_experts_start_len``.
        """
        if num_hidden_layers < 1 or top_k < 1:
            raise ValueError(f"num_hidden_layers and top_k must be >= 1, got {num_hidden_layers} and {top_k}")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"SGLang routed_experts is not valid base64: {exc}") from None
        row = num_hidden_layers * top_k * 4
        if len(raw) % row:
            raise ValueError(
                f"SGLang routed_experts has {len(raw)} bytes, not a multiple of "
                f"num_hidden_layers({num_hidden_layers}) * top_k({top_k}) * 4"
            )
        flat = np.frombuffer(raw, dtype="<i4").reshape(-1, num_hidden_layers, top_k)
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
        layers = list(range(num_hidden_layers)) if moe_layers is None else list(moe_layers)
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in layers):
            raise ValueError(f"moe_layers must be layer indices (integers), got {layers}")
        if layers and (min(layers) < 0 or max(layers) >= num_hidden_layers):
            raise ValueError(f"moe_layers {layers} outside the {source} array's {num_hidden_layers} layers")
        return cls(arr[:, layers, :], num_experts, layers, start)

    def to_sglang(self, num_hidden_layers: int) -> str:
        """SGLang's wire form: base64 int32 ``[T, num_hidden_layers, top_k]``, dense layers as zeros."""
        full = np.zeros((self.num_tokens, num_hidden_layers, self.top_k), dtype="<i4")
        full[:, list(self.moe_layers), :] = self.to_int32()
        return base64.b64encode(full.tobytes()).decode("ascii")
