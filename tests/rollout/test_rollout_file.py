"""Rollout file: round trip, atomicity, and a clear error for every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.presets import init_model
from rollout.rollout_file import (
    FORMAT_VERSION, _crc32, _crc32_v2, decode_rollouts, encode_rollouts, load_rollouts, model_fingerprint,
    save_rollouts,
)
from rollout.routed_experts import RoutedExperts
from rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout

# R3_FUZZ_SCALE=100 turns these bounded fuzz tests into the long campaign (docs/benchmarks.md, issue 14).
FUZZ_SCALE = int(os.environ.get("R3_FUZZ_SCALE", "1"))


def _rollout(seed: int, prompt_len: int, out_len: int, num_experts: int = 8, start: int = 0, routes=True) -> Rollout:
    rng = np.random.default_rng(seed)
    n_rows = prompt_len + out_len - 1 - start
    ids = np.stack([rng.permutation(num_experts)[:2] for _ in range(n_rows * 3)]).reshape(n_rows, 3, 2)
    ids[-1] = -1  # a missing row round-trips as the sentinel
    return Rollout(
        prompt_ids=rng.integers(0, 500, prompt_len).tolist(),
        output_ids=rng.integers(0, 500, out_len).tolist(),
        output_logprobs=(-rng.random(out_len)).astype(np.float32).tolist(),
        finish_reason=FINISH_STOP if seed % 2 else FINISH_LENGTH,
        routed_experts=RoutedExperts(ids, num_experts, (0, 2, 3), start) if routes else None,
        meta={"seed": seed},
    )


def _same(a: Rollout, b: Rollout) -> None:
    assert (a.prompt_ids, a.output_ids, a.finish_reason, a.meta) == (b.prompt_ids, b.output_ids, b.finish_reason, b.meta)
    assert np.array_equal(np.float32(a.output_logprobs), np.float32(b.output_logprobs))
    assert a.routed_experts == b.routed_experts


@pytest.mark.parametrize("num_experts", [8, 300])  # uint8 and uint16 route ids
def test_round_trip(tmp_path, num_experts):
    rollouts = [_rollout(1, 5, 4, num_experts), _rollout(2, 3, 1, num_experts, start=2),
                _rollout(3, 2, 3, num_experts, routes=False)]
    path = save_rollouts(tmp_path / "r.safetensors", rollouts, model_fingerprint="r3fp1:abc", meta={"run": "t"})
    loaded, header = load_rollouts(path)
    assert len(loaded) == 3
    for a, b in zip(rollouts, loaded):
        _same(a, b)
    assert header.format_version == FORMAT_VERSION
    assert (header.model_fingerprint, header.num_experts, header.moe_layers, header.top_k, header.meta) == (
        "r3fp1:abc", num_experts, (0, 2, 3), 2, {"run": "t"})
    assert loaded[0].routed_experts.ids.dtype == (np.uint8 if num_experts <= 255 else np.uint16)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temporary left behind


def test_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    path = save_rollouts(tmp_path / "r.safetensors", [_rollout(1, 4, 2)])
    with safe_open(str(path), "np") as f:
        assert f.metadata()["format"] == "r3-rollouts"
        assert f.get_tensor("route_ids").shape == (5, 3, 2)


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="no rollouts"):
        encode_rollouts([])
    bad = _rollout(1, 3, 2)
    bad.output_logprobs = bad.output_logprobs[:1]
    with pytest.raises(ValueError, match="2 output ids but 1 logprobs"):
        encode_rollouts([bad])
    with pytest.raises(ValueError, match="routes of another model"):
        encode_rollouts([_rollout(1, 3, 2, 8), _rollout(2, 3, 2, 16)])
    odd = _rollout(1, 3, 2)
    odd.meta = {"x": object()}
    with pytest.raises(ValueError, match="plain JSON"):
        encode_rollouts([odd])


def _rewrite(data: bytes, edit) -> bytes:
    """Apply ``edit`` to the parsed safetensors header and re-serialise it, keeping the tensor bytes."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _edit_inner(key, value, fix_crc=False):
    """Change one field of the JSON header; with ``fix_crc`` also re-sign it, as a crafted file would."""
    def edit(h):
        inner = json.loads(h["__metadata__"]["header"])
        inner[key] = value
        h["__metadata__"]["header"] = json.dumps(inner)
        if fix_crc:
            h["__metadata__"]["crc32"] = str(_crc32_v2(h["__metadata__"]["header"], _TENSORS_OF_DATA))
    return edit


_TENSORS_OF_DATA: dict = {}


def test_corruption_is_named():
    from safetensors.numpy import load

    data = encode_rollouts([_rollout(1, 5, 4), _rollout(2, 4, 3)])
    decode_rollouts(data)  # the pristine bytes load
    _TENSORS_OF_DATA.update(load(data))
    cases = {
        "truncated": data[:-7],
        "too short": data[:5],
        "not valid JSON": data[:8] + b"{" * 20 + data[28:],
        "CRC32": data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:],
        "format version": _rewrite(data, lambda h: h["__metadata__"].update(format_version="99")),
        "not an R3 rollout file": _rewrite(data, lambda h: h["__metadata__"].update(format="other")),
        "one entry per sequence": _rewrite(data, _edit_inner("finish_reasons", ["stop"], fix_crc=True)),
        "must each be one of": _rewrite(data, _edit_inner("finish_reasons", ["stop", 7], fix_crc=True)),
        "must be integers": _rewrite(data, _edit_inner("num_experts", "8", fix_crc=True)),
        "strictly increasing": _rewrite(data, _edit_inner("moe_layers", [0, 3, 2], fix_crc=True)),
        "not valid JSON ": _rewrite(data, lambda h: h["__metadata__"].update(
            header="[" * 100_000, crc32=str(_crc32_v2("[" * 100_000, _TENSORS_OF_DATA)))),
        "claims": struct.pack("<Q", 2**64 - 1) + data[8:],
        "holds tensors": _rewrite(data, lambda h: h.update(extra=h["prompt_lens"])),
        "tensor 'prompt_lens' is BF16": _rewrite(data, lambda h: h["prompt_lens"].update(dtype="BF16")),
        "more bytes than the file holds": _rewrite(data, lambda h: h["token_ids"].update(shape=[2**62])),
        "no safetensors __metadata__": _rewrite(data, lambda h: h.update(__metadata__=["r3-rollouts"])),
        "header metadata is not a string": _rewrite(data, lambda h: h["__metadata__"].update(header=5)),
        "rollout_meta entries must be JSON objects": _rewrite(data, _edit_inner("rollout_meta", [1, 2], fix_crc=True)),
        "meta must be a JSON object": _rewrite(data, _edit_inner("meta", [], fix_crc=True)),
        "model_fingerprint must be": _rewrite(data, _edit_inner("model_fingerprint", 3, fix_crc=True)),
    }
    for message, blob in cases.items():
        with pytest.raises(ValueError, match=message):
            decode_rollouts(blob)


def test_inconsistent_offsets_are_named():
    from safetensors.numpy import load, save

    data = encode_rollouts([_rollout(1, 5, 4), _rollout(2, 4, 3)])
    tensors = load(data)
    (n,) = struct.unpack_from("<Q", data)
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]

    def broken(name, value, error):
        t = dict(tensors, **{name: value})
        crc = str(_crc32_v2(metadata["header"], t))  # a consistent CRC isolates the offset check
        with pytest.raises(ValueError, match=error):
            decode_rollouts(save(t, metadata=dict(metadata, crc32=crc)))

    broken("token_offsets", np.array([0, 9, 8], np.int64), "token_offsets must rise")
    broken("token_offsets", np.array([0, 9], np.int64), "token_offsets has 2 entries")
    broken("route_offsets", np.array([0, 15, 14], np.int64), "route_offsets must rise")
    broken("prompt_lens", np.array([0, 4], np.int32), "prompt_lens must lie")
    broken("output_logprobs", tensors["output_logprobs"][:-1], "6 output_logprobs for 7 output tokens")
    broken("route_starts", np.array([0, 5], np.int64), "exceed its 7 tokens")
    broken("token_ids", tensors["token_ids"].astype(np.int64), "tensor 'token_ids' is I64")


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_rollouts(tmp_path / "nope.safetensors")


def test_model_fingerprint(tmp_path):
    a = init_model("tiny-qwen3-moe", tmp_path / "a", seed=0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    fa = model_fingerprint(a)
    assert fa.startswith("r3fp1:") and fa == model_fingerprint(b)  # same weights, other directory
    weights = b / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(b) != fa
    with pytest.raises(ValueError, match="no config.json"):
        model_fingerprint(tmp_path)


@pytest.mark.parametrize("key, value", [("finish_reasons", ["length", "length"]), ("num_experts", 16),
                                        ("moe_layers", [0, 2, 4]), ("rollout_meta", [{"seed": 1}, {"seed": 3}])])
def test_metadata_edits_are_caught_by_the_checksum(key, value):
    """Version 2's CRC covers the JSON header: an edit that still parses is refused, not loaded."""
    data = encode_rollouts([_rollout(1, 5, 4), _rollout(2, 4, 3)])
    with pytest.raises(ValueError, match="CRC32 of its header and tensors"):
        decode_rollouts(_rewrite(data, _edit_inner(key, value)))


def test_every_flipped_bit_of_the_json_header_is_caught():
    data = encode_rollouts([_rollout(1, 5, 4)])
    (n,) = struct.unpack_from("<Q", data)
    for pos in range(8, 8 + n, 3):
        for bit in (0, 3, 6):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(ValueError):
                decode_rollouts(bytes(bad))


def test_version_1_files_still_load():
    from safetensors.numpy import load, save

    rollouts = [_rollout(1, 5, 4), _rollout(2, 4, 3)]
    data = encode_rollouts(rollouts)
    (n,) = struct.unpack_from("<Q", data)
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load(data)
    inner = dict(json.loads(metadata["header"]), crc32=_crc32(tensors))
    old = save(tensors, metadata={"format": "r3-rollouts", "format_version": "1", "header": json.dumps(inner)})
    loaded, header = decode_rollouts(old)
    assert header.format_version == 1
    for a, b in zip(rollouts, loaded):
        _same(a, b)


# ------------------------------------------------------------------ fuzzing (bounded; the big run is in bench/)
_FUZZ_ROLLOUTS = [_rollout(1, 5, 4), _rollout(2, 4, 3), _rollout(3, 3, 2, routes=False)]
_FUZZ_FILE = encode_rollouts(_FUZZ_ROLLOUTS)


@settings(max_examples=150 * FUZZ_SCALE, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_FILE) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(_FUZZ_FILE)))
def test_fuzz_damaged_files_fail_loudly_or_load_unchanged(edits, cut):
    """Any damage is a ValueError; the rare edit that still loads (JSON whitespace) changed nothing."""
    data = bytearray(_FUZZ_FILE)
    for pos, value in edits:
        data[pos] = value
    try:
        loaded, _ = decode_rollouts(bytes(data[:cut]) if cut < len(data) // 2 else bytes(data))
    except ValueError:
        return
    for a, b in zip(_FUZZ_ROLLOUTS, loaded, strict=True):
        _same(a, b)


@settings(max_examples=100 * FUZZ_SCALE, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_raise_only_value_error(data):
    for blob in (data, struct.pack("<Q", len(data)) + data, _FUZZ_FILE[:64] + data):
        try:
            decode_rollouts(blob)
        except ValueError:
            pass
