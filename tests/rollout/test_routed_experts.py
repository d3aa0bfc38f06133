"""The RoutedExperts contract: compact storage, round trips, and loud failures on corruption."""

from __future__ import annotations

import base64
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout import RoutedExperts
from rollout.routed_experts import _HEADER, FORMAT_VERSION, HEADER_BYTES, MAGIC, compact_dtype, sentinel_for

# R3_FUZZ_SCALE=100 turns these bounded fuzz tests into the long campaign (docs/benchmarks.md, issue 14).
FUZZ_SCALE = int(os.environ.get("R3_FUZZ_SCALE", "1"))


def handmade_blob(version: int, ids: bytes, shape=(1, 1, 2), num_experts: int = 8, moe_layers=None) -> bytes:
    """An encoded payload built field by field (uint8 ids), with the CRC each format version defines."""
    tokens, layers, top_k = shape
    table = np.asarray(moe_layers if moe_layers is not None else range(layers), "<u2").tobytes()
    payload = table + ids
    head = _HEADER.pack(MAGIC, version, 1, 0, tokens, layers, top_k, num_experts, 0, 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(head)) if version >= 2 else zlib.crc32(payload)
    return head + struct.pack("<I", crc) + payload


def random_routes(rng: np.random.Generator, tokens: int, layers: int, top_k: int, num_experts: int) -> np.ndarray:
    """Distinct ids per (token, layer) row, like a real top-k."""
    keys = rng.random((tokens, layers, num_experts))
    return np.argpartition(keys, top_k - 1, axis=-1)[..., :top_k].astype(np.int64)


shapes = st.tuples(
    st.integers(0, 40),  # tokens
    st.integers(1, 6),  # layers
    st.sampled_from([2, 7, 8, 16, 128, 255, 256, 1000, 65535]),  # num_experts, both dtypes and their edges
    st.integers(1, 8),  # top_k
    st.integers(0, 2**40),  # start
    st.integers(0, 2**32 - 1),  # seed
)


def make(tokens, layers, num_experts, top_k, start, seed, *, missing: float = 0.1) -> tuple[np.ndarray, RoutedExperts]:
    top_k = min(top_k, num_experts)
    rng = np.random.default_rng(seed)
    if num_experts > 4096:  # argpartition over 65535 keys per row is slow; draw distinct ids by rejection instead
        ids = np.stack([rng.choice(num_experts, size=top_k, replace=False) for _ in range(tokens * layers)] or
                       [np.zeros(top_k, np.int64)])[: tokens * layers].reshape(tokens, layers, top_k)
    else:
        ids = random_routes(rng, tokens, layers, top_k, num_experts)
    ids[rng.random((tokens, layers)) < missing] = -1
    moe_layers = sorted(rng.choice(3 * layers, size=layers, replace=False).tolist())
    return ids, RoutedExperts(ids, num_experts, moe_layers, start)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_binary_round_trip(shape):
    ids, re = make(*shape)
    assert re.ids.dtype == compact_dtype(re.num_experts)
    back = RoutedExperts.decode(re.encode())
    assert back == re
    assert back.ids.dtype == re.ids.dtype
    assert RoutedExperts.from_base64(re.to_base64()) == re
    np.testing.assert_array_equal(re.to_torch().numpy(), np.where(ids < 0, -1, ids))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_sglang_and_vllm_round_trip(shape):
    tokens, layers, num_experts, top_k, start, seed = shape
    _, re = make(tokens, layers, num_experts, top_k, start, seed, missing=0.0)
    num_hidden = max(re.moe_layers) + 1
    sglang = RoutedExperts.from_sglang(
        re.to_sglang(num_hidden), num_experts=num_experts, num_hidden_layers=num_hidden,
        top_k=re.top_k, moe_layers=re.moe_layers, start=start, num_tokens=tokens,
    )
    assert sglang == re
    full = np.zeros((tokens, num_hidden, re.top_k), np.int32)
    full[:, list(re.moe_layers)] = re.to_int32()
    assert RoutedExperts.from_vllm(full, num_experts=num_experts, moe_layers=re.moe_layers, start=start) == re


def test_dtype_and_sentinel_edges():
    assert compact_dtype(255) == np.uint8 and sentinel_for(255) == 255
    assert compact_dtype(256) == np.uint16 and sentinel_for(256) == 65535
    assert compact_dtype(65535) == np.uint16
    with pytest.raises(ValueError, match="num_experts"):
        compact_dtype(65536)
    re = RoutedExperts(torch.tensor([[[254, 0]], [[-1, -1]]]), 255)
    assert re.ids.dtype == np.uint8 and re.ids[1].tolist() == [[255, 255]]
    assert re.row_mask().tolist() == [[True], [False]]


def test_size_qwen3_30b_a3b_shape():
    """48 MoE layers x top-8 of 128 experts: 384 bytes a token plus a fixed header; SGLang's int32 takes 2048."""
    rng = np.random.default_rng(0)
    small = RoutedExperts(random_routes(rng, 10, 48, 8, 128), 128)
    big = RoutedExperts(random_routes(rng, 1010, 48, 8, 128), 128)
    per_token = (len(big.encode()) - len(small.encode())) / 1000
    assert per_token == 384
    assert len(big.encode()) == HEADER_BYTES + 2 * 48 + 384 * 1010
    assert len(big.to_sglang(48)) / big.num_tokens == 2048  # base64 text of int32: 48 * 8 * 4 * 4/3


def test_slice_and_concat_turns():
    rng = np.random.default_rng(1)
    re = RoutedExperts(random_routes(rng, 30, 3, 2, 8), 8, [1, 2, 4], start=5)
    a, b, c = re.slice(5, 12), re.slice(12, 20), re.slice(20)
    assert (a.start, b.start, c.start, c.end) == (5, 12, 20, 35)
    assert RoutedExperts.concat([a, b, c]) == re
    with pytest.raises(ValueError, match="gap"):
        RoutedExperts.concat([a, c])
    with pytest.raises(ValueError, match="overlap"):
        RoutedExperts.concat([re.slice(5, 15), b])
    with pytest.raises(ValueError, match="outside"):
        re.slice(0, 10)
    other = RoutedExperts(random_routes(rng, 3, 3, 2, 16), 16, [1, 2, 4], start=12)
    with pytest.raises(ValueError, match="different models"):
        RoutedExperts.concat([a, other])


@pytest.mark.parametrize(
    "ids, num_experts, moe_layers, match",
    [
        (np.zeros((2, 3), dtype=np.int64), 8, None, "shape"),
        (np.array([[[0, 9]]]), 8, None, "out of range"),
        (np.array([[[3, 3]]]), 8, None, "duplicate"),
        (np.array([[[3, -1]]]), 8, None, "partly missing"),
        (np.array([[[0, 1]], [[1, 2]]], dtype=np.float32), 8, None, "integers"),
        (np.array([[[0, 1], [1, 2]]]), 8, [3, 1], "increasing"),
        (np.array([[[0, 1], [1, 2]]]), 8, [0], "entries"),
        (np.zeros((1, 1, 9), dtype=np.int64), 8, None, "top_k"),
    ],
)
def test_invalid_routes_are_named(ids, num_experts, moe_layers, match):
    with pytest.raises(ValueError, match=match):
        RoutedExperts(ids, num_experts, moe_layers)


def test_compact_input_out_of_range_is_caught():
    ids = np.full((1, 1, 2), 9, dtype=np.uint8)
    ids[0, 0, 1] = 1
    with pytest.raises(ValueError, match="out of range|>= num_experts"):
        RoutedExperts(ids, 8)


class TestCorruptPayloads:
    @pytest.fixture
    def blob(self) -> bytes:
        rng = np.random.default_rng(2)
        return RoutedExperts(random_routes(rng, 6, 4, 2, 8), 8).encode()

    def test_truncated(self, blob):
        for cut in (0, 5, HEADER_BYTES - 1, HEADER_BYTES + 3, len(blob) - 1):
            with pytest.raises(ValueError, match="truncated"):
                RoutedExperts.decode(blob[:cut])

    def test_trailing_bytes(self, blob):
        with pytest.raises(ValueError, match="trailing"):
            RoutedExperts.decode(blob + b"\0")

    def test_bad_magic(self, blob):
        with pytest.raises(ValueError, match="magic"):
            RoutedExperts.decode(b"XXXX" + blob[4:])

    def test_bad_version(self, blob):
        with pytest.raises(ValueError, match="version"):
            RoutedExperts.decode(blob[:4] + struct.pack("<H", 99) + blob[6:])

    def test_length_does_not_match_shape(self, blob):
        bigger = bytearray(blob)
        struct.pack_into("<I", bigger, 8, 7)  # claim 7 tokens instead of 6
        with pytest.raises(ValueError, match="needs"):
            RoutedExperts.decode(bytes(bigger))

    def test_flipped_payload_byte(self, blob):
        bad = bytearray(blob)
        bad[-1] ^= 0x01
        with pytest.raises(ValueError, match="CRC32"):
            RoutedExperts.decode(bytes(bad))

    def test_out_of_range_id_with_valid_crc(self):
        """A writer that skipped validation: the CRC is fine, the ids are not (both format versions)."""
        for version in (1, 2):
            with pytest.raises(ValueError, match=">= num_experts"):
                RoutedExperts.decode(handmade_blob(version, bytes([0, 9])))

    def test_duplicate_ids_with_valid_crc(self):
        for version in (1, 2):
            with pytest.raises(ValueError, match="duplicate"):
                RoutedExperts.decode(handmade_blob(version, bytes([4, 4])))

    def test_every_header_bit_flip_is_caught(self, blob):
        """Version 2's CRC covers the header: no single-bit flip anywhere decodes into other routes."""
        for byte in range(len(blob)):
            for bit in range(8):
                bad = bytearray(blob)
                bad[byte] ^= 1 << bit
                with pytest.raises(ValueError):
                    RoutedExperts.decode(bytes(bad))

    def test_version_1_still_decodes(self, blob):
        routes = RoutedExperts.decode(blob)
        old = handmade_blob(1, routes.ids.tobytes(), shape=routes.ids.shape, num_experts=8)
        assert RoutedExperts.decode(old) == routes
        assert struct.unpack_from("<H", blob, 4)[0] == FORMAT_VERSION == 2

    def test_a_lying_header_allocates_nothing(self):
        """The largest shape the header can declare, over a few bytes: refused before any array is built."""
        import tracemalloc

        huge = _HEADER.pack(MAGIC, 2, 2, 0, 2**32 - 1, 2**16 - 1, 2**16 - 1, 65535, 0, 0) + b"\0" * 64
        tracemalloc.start()
        with pytest.raises(ValueError, match="truncated"):
            RoutedExperts.decode(huge)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20

    def test_non_bytes_input_is_a_value_error(self):
        for junk in ("R3RE", 5, None, [1, 2, 3]):
            with pytest.raises(ValueError, match="must be bytes"):
                RoutedExperts.decode(junk)
            with pytest.raises(ValueError, match="base64"):
                RoutedExperts.from_base64(junk if not isinstance(junk, str) else junk + "!")

    def test_bad_base64(self):
        with pytest.raises(ValueError, match="base64"):
            RoutedExperts.from_base64("not base64!!")


def test_sglang_errors_are_named():
    good = base64.b64encode(np.zeros((3, 2, 2), "<i4").tobytes()).decode()
    with pytest.raises(ValueError, match="not a multiple"):
        RoutedExperts.from_sglang(good, num_experts=8, num_hidden_layers=5, top_k=2)
    with pytest.raises(ValueError, match="expected 4"):
        RoutedExperts.from_sglang(good, num_experts=8, num_hidden_layers=2, top_k=2, num_tokens=4)
    with pytest.raises(ValueError, match="base64"):
        RoutedExperts.from_sglang("%%%", num_experts=8, num_hidden_layers=2, top_k=2)
    with pytest.raises(ValueError, match="outside"):
        RoutedExperts.from_sglang(good, num_experts=8, num_hidden_layers=2, top_k=2, moe_layers=[1, 2])
    with pytest.raises(ValueError, match="integers"):
        RoutedExperts.from_vllm(np.zeros((1, 2, 2), np.int32), num_experts=8, moe_layers=[0.5])
    # zeros everywhere are duplicate ids within a row: SGLang's dense-layer zeros must be dropped via moe_layers
    with pytest.raises(ValueError, match="duplicate"):
        RoutedExperts.from_sglang(good, num_experts=8, num_hidden_layers=2, top_k=2)


def test_sglang_dense_layers_must_be_zero():
    """SGLang writes zeros for dense layers; anything else means the layer table is not the server's."""
    full = np.zeros((2, 3, 2), "<i4")
    full[:, 1] = [[0, 1], [2, 3]]
    b64 = base64.b64encode(full.tobytes()).decode()
    routes = RoutedExperts.from_sglang(b64, num_experts=8, num_hidden_layers=3, top_k=2, moe_layers=[1])
    assert routes.ids[:, 0].tolist() == [[0, 1], [2, 3]]
    full[1, 2] = [4, 5]
    with pytest.raises(ValueError, match=r"non-zero ids in layers \[0, 2\]"):
        RoutedExperts.from_sglang(base64.b64encode(full.tobytes()).decode(), num_experts=8, num_hidden_layers=3,
                                  top_k=2, moe_layers=[1])


@pytest.mark.parametrize(
    "ids",
    [
        np.array([[[0, -5]]]),
        np.array([[[-(2**31), 1]]], dtype=np.int32),
        np.array([[[2**64 - 1, 1]]], dtype=np.uint64),  # a wrapped -1 is not the sentinel
        np.array([[[-2, -2]]], dtype=np.int8),
        torch.tensor([[[3, -7]]]),
    ],
)
def test_negative_ids_other_than_minus_one_are_errors(ids):
    with pytest.raises(ValueError, match="negative|out of range"):
        RoutedExperts(ids, 8)


def test_negative_ids_are_errors_in_every_converter():
    full = np.array([[[0, 1], [-3, 2]]], dtype=np.int32)
    b64 = base64.b64encode(full.astype("<i4").tobytes()).decode()
    with pytest.raises(ValueError, match="negative"):
        RoutedExperts.from_sglang(b64, num_experts=8, num_hidden_layers=2, top_k=2)
    with pytest.raises(ValueError, match="negative"):
        RoutedExperts.from_vllm(full, num_experts=8)
    # The documented sentinel survives every path: -1 rows in, -1 rows out of to_torch, and back.
    routes = RoutedExperts(np.array([[[0, 1]], [[-1, -1]]]), 8)
    assert RoutedExperts(routes.to_torch(), 8) == routes
    assert RoutedExperts.from_vllm(routes.to_int32(), num_experts=8) == routes


def test_constructor_arguments_are_checked_by_name():
    ids = np.zeros((1, 1, 1), np.int64)
    for kwargs, match in [
        ({"num_experts": None}, "num_experts"),
        ({"num_experts": 8.0}, "num_experts"),
        ({"num_experts": 8, "start": 1.5}, "start"),
        ({"num_experts": 8, "start": -1}, "start"),
        ({"num_experts": 8, "start": 2**63}, "start"),
        ({"num_experts": 8, "moe_layers": [True]}, "moe_layers"),
        ({"num_experts": 8, "moe_layers": [70000]}, "moe_layers"),
        ({"num_experts": 8, "moe_layers": 3}, "moe_layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            RoutedExperts(ids, **kwargs)


def test_newer_sglang_compact_wire_dtypes():
    """SGLang with SGLANG_ROUTED_EXPERTS_DTYPE=uint8/uint16 names the dtype in meta_info; the same routes come back."""
    rng = np.random.default_rng(4)
    routes = RoutedExperts(random_routes(rng, 5, 2, 2, 300), 300, moe_layers=[1, 2])
    full = np.zeros((5, 3, 2), np.int64)
    full[:, 1:] = routes.to_int32()
    for wire in ("int32", "uint16"):
        b64 = base64.b64encode(full.astype(np.dtype(wire).newbyteorder("<")).tobytes()).decode()
        back = RoutedExperts.from_sglang(
            b64, num_experts=300, num_hidden_layers=3, top_k=2, moe_layers=[1, 2], num_tokens=5, wire_dtype=wire
        )
        assert back == routes
    with pytest.raises(ValueError, match="not a multiple"):  # uint16 bytes read as int32: the length tells
        RoutedExperts.from_sglang(b64[:-4], num_experts=300, num_hidden_layers=3, top_k=2, moe_layers=[1, 2])
    with pytest.raises(ValueError, match="routed_experts_dtype"):
        RoutedExperts.from_sglang(b64, num_experts=300, num_hidden_layers=3, top_k=2, wire_dtype="int64")


# ------------------------------------------------------------------ fuzzing (bounded; the big run is in bench/)
@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes_raise_only_value_error(data):
    for blob in (data, MAGIC + data, MAGIC + struct.pack("<H", 2) + data):
        try:
            RoutedExperts.decode(blob)
        except ValueError:
            pass


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(shapes, st.data())
def test_fuzz_mutated_payloads_never_decode_silently(shape, data):
    """A burst of up to 4 changed bytes, a cut or an insertion: always a ValueError (CRC32 catches every such burst)."""
    _, re = make(*shape)
    blob = bytearray(re.encode())
    kind = data.draw(st.sampled_from(["burst", "cut", "insert"]))
    if kind == "burst":
        at = data.draw(st.integers(0, len(blob) - 1))
        width = data.draw(st.integers(1, min(4, len(blob) - at)))
        noise = data.draw(st.binary(min_size=width, max_size=width))
        if noise == bytes(blob[at : at + width]):
            return
        blob[at : at + width] = noise
    elif kind == "cut":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(ValueError):
        RoutedExperts.decode(bytes(blob))
