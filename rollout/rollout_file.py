"""The rollout file: finished rollouts with their routes, in one versioned safetensors file.

Why safetensors: every stack (torch, numpy, Rust, JS) reads it without our
code, it is never pickle, and its JSON header carries our metadata. Flat
concatenated arrays plus offsets keep it one contiguous read however many
sequences it holds, and route ids stay in their compact uint8/uint16 form.
The layout (format ``r3-rollouts``, version 2) is documented for outside
readers in ``docs/recipes.md``, section "The rollout file". A CRC32 over the
JSON header and every tensor's name, dtype, shape and bytes sits in the
safetensors metadata, because safetensors detects truncation but not flipped
bytes (version 1 covered only the tensor bytes, so a flip in its JSON changed
``finish_reason`` or ``moe_layers`` silently; version 1 files still load).
A file is outside input: every inconsistency in it, however crafted, is a
``ValueError`` naming it, and sizes are checked against the bytes there before
anything is allocated.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from rollout.atomic import atomic_write_bytes
from rollout.routed_experts import MAX_EXPERTS, RoutedExperts, compact_dtype
from rollout.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Rollout

FORMAT_NAME = "r3-rollouts"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: CRC32 of the tensor bytes inside the JSON header; 2: CRC32 of everything
# name -> (accepted dtypes, ndim), in the order they feed the CRC.
_TENSORS = {
    "token_ids": ((np.dtype(np.int32),), 1),
    "token_offsets": ((np.dtype(np.int64),), 1),
    "prompt_lens": ((np.dtype(np.int32),), 1),
    "output_logprobs": ((np.dtype(np.float32),), 1),
    "route_ids": ((np.dtype(np.uint8), np.dtype(np.uint16)), 3),
    "route_offsets": ((np.dtype(np.int64),), 1),
    "route_starts": ((np.dtype(np.int64),), 1),
}
NO_ROUTES = -1
# Fingerprinting reads at most this much of each weight file at each end, so a 60 GB checkpoint takes milliseconds.
FINGERPRINT_EDGE_BYTES = 1 << 20
FINGERPRINT_PREFIX = "r3fp1:"
_LENGTH_PREFIX = struct.Struct("<Q")
_SAFETENSORS_DTYPES = {"I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "F32": np.dtype(np.float32),
                       "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16)}  # every dtype _TENSORS accepts
_FINISH_REASONS = (FINISH_LENGTH, FINISH_STOP, FINISH_ABORT)
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True)
class RolloutFileHeader:
    """What a rollout file says about itself, beside the rollouts."""

    format_version: int
    model_fingerprint: str | None
    num_experts: int | None
    moe_layers: tuple[int, ...] | None
    top_k: int | None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- fingerprint
def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short identity of a checkpoint, so routes recorded on another model are refused.

    Hashes ``config.json`` (canonical JSON without ``transformers_version``,
    which changes on a re-save that leaves the model alone) and, for every
    ``*.safetensors`` file, its name, size, tensor table (names, dtypes, shapes)
    and its first and last ``FINGERPRINT_EDGE_BYTES``. Files up to twice that are
    hashed whole; in a bigger shard an edit in the middle that keeps the size
    goes unnoticed. That is the price of fingerprinting large checkpoints fast.
    """
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {str(root)!r}: not an HF-format checkpoint")
    config = json.loads(config_path.read_text())
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"no *.safetensors files in {str(root)!r}")
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            header = _read_header(f, str(path))
            table = {k: [v["dtype"], v["shape"]] for k, v in header.items() if k != "__metadata__"}
            digest.update(json.dumps(table, sort_keys=True).encode())
            f.seek(0)
            if size <= 2 * FINGERPRINT_EDGE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(FINGERPRINT_EDGE_BYTES))
                f.seek(size - FINGERPRINT_EDGE_BYTES)
                digest.update(f.read(FINGERPRINT_EDGE_BYTES))
    return FINGERPRINT_PREFIX + digest.hexdigest()[:32]


def _read_header(f: BinaryIO, what: str) -> dict[str, Any]:
    """The safetensors JSON header, with a clear error for truncation or garbage."""
    prefix = f.read(_LENGTH_PREFIX.size)
    if len(prefix) < _LENGTH_PREFIX.size:
        raise ValueError(f"{what} is truncated: {len(prefix)} bytes, too short for a safetensors header")
    (length,) = _LENGTH_PREFIX.unpack(prefix)
    here = f.tell()
    available = f.seek(0, os.SEEK_END) - here
    f.seek(here)
    if length > available:  # checked before reading: the prefix may claim up to 2**64 bytes
        raise ValueError(f"{what} is truncated: its header claims {length} bytes but only {available} follow")
    raw = f.read(length)
    header = _json(raw, f"{what} is corrupt: the safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{what} is corrupt: the safetensors header is not a JSON object")
    return header


def _json(raw: bytes | str, what: str) -> Any:
    """``json.loads`` whose every failure (bad UTF-8, syntax, nesting too deep, a 5000-digit number) is a ValueError."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


# ----------------------------------------------------------------- writing
def save_rollouts(
    path: str | os.PathLike,
    rollouts: Sequence[Rollout],
    model_fingerprint: str | None = None,
    meta: dict | None = None,
) -> Path:
    """Write ``rollouts`` to ``path`` atomically (a crash leaves the old file or the new one)."""
    return atomic_write_bytes(path, encode_rollouts(rollouts, model_fingerprint=model_fingerprint, meta=meta))


def encode_rollouts(
    rollouts: Sequence[Rollout], model_fingerprint: str | None = None, meta: dict | None = None
) -> bytes:
    """The bytes of a rollout file; ``save_rollouts`` without the disk, for servers and tests."""
    from safetensors.numpy import save

    rollouts = list(rollouts)
    if not rollouts:
        raise ValueError("no rollouts to save")
    routed = [r.routed_experts for r in rollouts if r.routed_experts is not None]
    model = routed[0] if routed else None
    for i, r in enumerate(rollouts):
        _check_rollout(i, r, model)
    seq_lens = np.array([r.num_tokens for r in rollouts], dtype=np.int64)
    route_rows = np.array([0 if r.routed_experts is None else r.routed_experts.num_tokens for r in rollouts], np.int64)
    route_shape = (0, 0, 0) if model is None else (0, model.num_layers, model.top_k)
    route_dtype = np.uint8 if model is None else model.ids.dtype
    tensors = {
        "token_ids": np.array([t for r in rollouts for t in r.token_ids], dtype=np.int32),
        "token_offsets": np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64),
        "prompt_lens": np.array([len(r.prompt_ids) for r in rollouts], dtype=np.int32),
        "output_logprobs": np.array([lp for r in rollouts for lp in r.output_logprobs], dtype=np.float32),
        "route_ids": (
            np.concatenate([p.ids for p in routed], axis=0) if routed else np.zeros(route_shape, route_dtype)
        ),
        "route_offsets": np.concatenate([[0], np.cumsum(route_rows)]).astype(np.int64),
        "route_starts": np.array(
            [NO_ROUTES if r.routed_experts is None else r.routed_experts.start for r in rollouts], dtype=np.int64
        ),
    }
    header = {
        "model_fingerprint": model_fingerprint,
        "num_experts": None if model is None else model.num_experts,
        "moe_layers": None if model is None else list(model.moe_layers),
        "top_k": None if model is None else model.top_k,
        "finish_reasons": [r.finish_reason for r in rollouts],
        "rollout_meta": [r.meta for r in rollouts],
        "meta": meta or {},
    }
    try:
        header_json = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rollout meta must be plain JSON (no NaN, no objects): {exc}") from None
    return save(tensors, metadata={
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "header": header_json,
        "crc32": str(_crc32_v2(header_json, tensors)),
    })


def _check_rollout(i: int, r: Rollout, model: RoutedExperts | None) -> None:
    """Everything ``decode_rollouts`` will demand of the file, checked before a byte is written."""
    if not r.prompt_ids:
        raise ValueError(f"rollout {i} has an empty prompt")
    if len(r.output_logprobs) != len(r.output_ids):
        raise ValueError(f"rollout {i} has {len(r.output_ids)} output ids but {len(r.output_logprobs)} logprobs")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t <= _INT32_MAX for t in r.token_ids):
        raise ValueError(f"rollout {i} has a token id that is not an integer in [0, 2**31)")
    if r.finish_reason not in _FINISH_REASONS:
        raise ValueError(f"rollout {i} has finish_reason {r.finish_reason!r}; expected one of {_FINISH_REASONS}")
    if not isinstance(r.meta, dict):
        raise ValueError(f"rollout {i} meta must be a dict, got {type(r.meta).__name__}")
    routes = r.routed_experts
    if routes is None:
        return
    if (routes.num_experts, routes.moe_layers, routes.top_k) != (model.num_experts, model.moe_layers, model.top_k):
        raise ValueError(
            f"rollout {i} has routes of another model: (num_experts, moe_layers, top_k) = "
            f"{(routes.num_experts, routes.moe_layers, routes.top_k)} vs {(model.num_experts, model.moe_layers, model.top_k)}"
        )
    if routes.end > r.num_tokens:
        raise ValueError(f"rollout {i} has routes up to position {routes.end} but only {r.num_tokens} tokens")


def _crc32(tensors: dict[str, np.ndarray]) -> int:
    """Version 1's checksum: the tensor bytes only."""
    crc = 0
    for name in _TENSORS:
        crc = zlib.crc32(np.ascontiguousarray(tensors[name]).tobytes(), crc)
    return crc


def _crc32_v2(header_json: str, tensors: dict[str, np.ndarray]) -> int:
    """Version 2's checksum: the JSON header, then each tensor's name, dtype, shape and bytes."""
    crc = zlib.crc32(header_json.encode("utf-8"))
    for name in _TENSORS:
        t = np.ascontiguousarray(tensors[name])
        crc = zlib.crc32(f"{name}|{t.dtype.str}|{list(t.shape)}".encode("ascii"), crc)
        crc = zlib.crc32(t.tobytes(), crc)
    return crc


# ----------------------------------------------------------------- reading
def load_rollouts(path: str | os.PathLike) -> tuple[list[Rollout], RolloutFileHeader]:
    """Read a rollout file; any inconsistency is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"rollout file {str(path)!r} does not exist")
    return decode_rollouts(path.read_bytes(), what=f"rollout file {str(path)!r}")


def decode_rollouts(data: bytes, what: str = "rollout file") -> tuple[list[Rollout], RolloutFileHeader]:
    """Parse a rollout file's bytes; any damage, truncation or crafted field is a ``ValueError`` naming it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    table = _read_header(io.BytesIO(data), what)
    info = table.get("__metadata__")
    if not isinstance(info, dict):
        raise ValueError(f"{what} is not an R3 rollout file (no safetensors __metadata__ object)")
    if info.get("format") != FORMAT_NAME:
        raise ValueError(f"{what} is not an R3 rollout file (format {info.get('format')!r}, expected {FORMAT_NAME!r})")
    version = {str(v): v for v in READABLE_VERSIONS}.get(info.get("format_version"))
    if version is None:
        raise ValueError(
            f"{what} has format version {info.get('format_version')!r}; this build reads versions {READABLE_VERSIONS}"
        )
    header_json = info.get("header")
    if not isinstance(header_json, str):
        raise ValueError(f"{what} is corrupt: its header metadata is not a string")
    _check_tensor_table(table, len(data), what)
    tensors = _load_tensors(data, what)
    if version >= 2:
        if info.get("crc32") != str(_crc32_v2(header_json, tensors)):
            raise ValueError(f"{what} is corrupt: CRC32 of its header and tensors does not match")
    header = _json(header_json, f"{what} is corrupt: its header metadata")
    if not isinstance(header, dict):
        raise ValueError(f"{what} is corrupt: its header metadata is not a JSON object")
    if version == 1 and _crc32(tensors) != header.get("crc32"):
        raise ValueError(f"{what} is corrupt: CRC32 of the tensor data does not match its header")
    return _unpack(tensors, header, version, what)


def _check_tensor_table(table: dict[str, Any], size: int, what: str) -> None:
    """The safetensors table names exactly our tensors, each in an accepted dtype with a plain shape.

    Checked before safetensors reads it, so an exotic dtype or a shape whose element count
    overflows is named here instead of surfacing as a TypeError or an allocation.
    """
    names = sorted(k for k in table if k != "__metadata__")
    if names != sorted(_TENSORS):
        raise ValueError(f"{what} holds tensors {names[:12]}; an R3 rollout file holds exactly {sorted(_TENSORS)}")
    for name, (dtypes, ndim) in _TENSORS.items():
        entry = table[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            dtype not in dtypes
            or not isinstance(shape, list)
            or len(shape) != ndim
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
        ):
            expected = " or ".join(str(d) for d in dtypes)
            got = f"{entry.get('dtype')} {shape}" if isinstance(entry, dict) else repr(entry)[:80]
            raise ValueError(f"{what}: tensor {name!r} is {got}, expected {ndim}-d {expected}")
        if math.prod(shape) * dtype.itemsize > size:
            raise ValueError(f"{what}: tensor {name!r} declares shape {shape}, more bytes than the file holds")


def _load_tensors(data: bytes, what: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except SafetensorError as exc:
        raise ValueError(f"{what} is corrupt or truncated: {exc}") from None


def _check_offsets(offsets: np.ndarray, count: int, total: int, name: str, what: str) -> None:
    if len(offsets) != count + 1:
        raise ValueError(f"{what}: {name} has {len(offsets)} entries for {count} sequences (expected {count + 1})")
    if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        raise ValueError(f"{what}: {name} must rise from 0 to {total}, got {offsets.tolist()[:8]}...")


def _unpack(
    t: dict[str, np.ndarray], header: dict, version: int, what: str
) -> tuple[list[Rollout], RolloutFileHeader]:
    n = len(t["prompt_lens"])
    reasons, metas = header.get("finish_reasons"), header.get("rollout_meta")
    if not isinstance(reasons, list) or not isinstance(metas, list) or len(reasons) != n or len(metas) != n:
        raise ValueError(f"{what}: finish_reasons and rollout_meta must list one entry per sequence ({n})")
    if any(r not in _FINISH_REASONS for r in reasons if isinstance(r, str)) or not all(isinstance(r, str) for r in reasons):
        raise ValueError(f"{what}: finish_reasons must each be one of {_FINISH_REASONS}")
    if not all(isinstance(m, dict) for m in metas):
        raise ValueError(f"{what}: rollout_meta entries must be JSON objects")
    fingerprint, file_meta = header.get("model_fingerprint"), header.get("meta", {})
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"{what}: model_fingerprint must be a string or null")
    if not isinstance(file_meta, dict):
        raise ValueError(f"{what}: meta must be a JSON object")
    if (t["token_ids"] < 0).any():
        raise ValueError(f"{what}: token_ids holds negative ids")
    _check_offsets(t["token_offsets"], n, len(t["token_ids"]), "token_offsets", what)
    seq_lens = np.diff(t["token_offsets"])
    prompt_lens = t["prompt_lens"].astype(np.int64)
    if ((prompt_lens < 1) | (prompt_lens > seq_lens)).any():
        raise ValueError(f"{what}: prompt_lens must lie in [1, sequence length]")
    out_offsets = np.concatenate([[0], np.cumsum(seq_lens - prompt_lens)])
    if out_offsets[-1] != len(t["output_logprobs"]):
        raise ValueError(
            f"{what}: {len(t['output_logprobs'])} output_logprobs for {int(out_offsets[-1])} output tokens"
        )
    route_ids = t["route_ids"]
    _check_offsets(t["route_offsets"], n, len(route_ids), "route_offsets", what)
    starts = t["route_starts"]
    if len(starts) != n:
        raise ValueError(f"{what}: route_starts has {len(starts)} entries for {n} sequences")
    num_experts, moe_layers, top_k = _route_shape(header, what)
    has_routes = starts != NO_ROUTES
    if has_routes.any():
        if num_experts is None:
            raise ValueError(f"{what}: routes present but num_experts / moe_layers / top_k missing from the header")
        if route_ids.dtype != compact_dtype(num_experts) or route_ids.shape[1:] != (len(moe_layers), top_k):
            raise ValueError(
                f"{what}: route_ids {route_ids.dtype} {route_ids.shape} do not fit num_experts={num_experts}, "
                f"{len(moe_layers)} MoE layers, top_k={top_k}"
            )
    rollouts = []
    for i in range(n):
        tok = t["token_ids"][t["token_offsets"][i] : t["token_offsets"][i + 1]].tolist()
        p = int(prompt_lens[i])
        r0, r1 = int(t["route_offsets"][i]), int(t["route_offsets"][i + 1])
        routes = None
        if has_routes[i]:
            start = int(starts[i])
            if start < 0 or start + (r1 - r0) > len(tok):
                raise ValueError(f"{what}: sequence {i} routes [{start}, {start + r1 - r0}) exceed its {len(tok)} tokens")
            try:
                routes = RoutedExperts(route_ids[r0:r1], num_experts, moe_layers, start)
            except ValueError as exc:
                raise ValueError(f"{what}: sequence {i} routes are invalid: {exc}") from None
        elif r1 != r0:
            raise ValueError(f"{what}: sequence {i} has route rows but route_starts marks it as carrying none")
        rollouts.append(Rollout(
            prompt_ids=tok[:p],
            output_ids=tok[p:],
            output_logprobs=t["output_logprobs"][out_offsets[i] : out_offsets[i + 1]].tolist(),
            finish_reason=reasons[i],
            routed_experts=routes,
            meta=dict(metas[i]),
        ))
    return rollouts, RolloutFileHeader(
        format_version=version,
        model_fingerprint=fingerprint,
        num_experts=num_experts,
        moe_layers=moe_layers,
        top_k=top_k,
        meta=dict(file_meta),
    )


def _route_shape(header: dict, what: str) -> tuple[int | None, tuple[int, ...] | None, int | None]:
    """``(num_experts, moe_layers, top_k)``: all null (no routes in the file) or all well-formed."""
    num_experts, moe_layers, top_k = header.get("num_experts"), header.get("moe_layers"), header.get("top_k")
    if num_experts is None and moe_layers is None and top_k is None:
        return None, None, None
    if (
        not all(isinstance(x, int) and not isinstance(x, bool) for x in (num_experts, top_k))
        or not isinstance(moe_layers, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in moe_layers)
    ):
        raise ValueError(f"{what}: num_experts / moe_layers / top_k must be integers (or all null)")
    if not 1 <= num_experts <= MAX_EXPERTS or not 1 <= top_k <= num_experts:
        raise ValueError(f"{what}: num_experts={num_experts} and top_k={top_k} are out of range")
    if not moe_layers or moe_layers[0] < 0 or any(a >= b for a, b in zip(moe_layers, moe_layers[1:])):
        raise ValueError(f"{what}: moe_layers must be non-negative and strictly increasing, got {moe_layers[:16]}")
    return num_experts, tuple(moe_layers), top_k
