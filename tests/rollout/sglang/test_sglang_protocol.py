"""SGLang wire format against real SGLang 0.5.17 replies, plus the clear errors for broken ones."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import pytest

from rollout.moe_spec import MoESpec
from rollout.routed_experts import RoutedExperts
from rollout.sglang.protocol import (
    build_reply,
    build_request,
    decode_finish_reason,
    decode_reply,
    parse_request,
    sampling_from_sglang,
    sampling_to_sglang,
)
from rollout.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams

# Cases of replies.json (see the fixture's README).
CASE_PREFIX_SOURCE, CASE_PREFIX_CACHED, CASE_START_LEN, CASE_NO_ROUTES = 0, 8, 9, 10


@pytest.fixture(scope="module")
def recorded(sglang_fixture):
    return json.loads((sglang_fixture / "replies.json").read_text())


@pytest.fixture(scope="module")
def spec(recorded):
    return MoESpec.from_config(recorded["config"])


def _decode(case, spec, **overrides):
    req = case["request"]
    kwargs = dict(
        start_len=req.get("routed_experts_start_len", 0), routes_requested=req.get("return_routed_experts", False)
    )
    kwargs.update(overrides)
    return decode_reply(case["reply"], req["input_ids"], spec, **kwargs)


def test_every_recorded_reply_decodes(recorded, spec):
    assert recorded["sglang_version"] == "0.5.17"
    for i, case in enumerate(recorded["cases"]):
        req, reply = case["request"], case["reply"]
        rollout = _decode(case, spec)
        assert rollout.prompt_ids == req["input_ids"]
        assert rollout.output_ids == reply["output_ids"]
        assert rollout.output_logprobs == [e[0] for e in reply["meta_info"]["output_token_logprobs"]]
        assert rollout.finish_reason == FINISH_LENGTH
        assert len(rollout.output_ids) == req["sampling_params"]["max_new_tokens"]
        if not req.get("return_routed_experts"):
            assert rollout.routed_experts is None, i
            continue
        routes = rollout.routed_experts
        start = req.get("routed_experts_start_len", 0)
        assert (routes.start, routes.end) == (start, rollout.num_tokens - 1), i
        spec.check(routes)
        assert routes.ids.dtype == np.uint8 and routes.row_mask().all()
        # Same ids as a plain int32 decode of SGLang's bytes.
        raw = np.frombuffer(base64.b64decode(reply["meta_info"]["routed_experts"]), "<i4")
        assert np.array_equal(routes.ids.reshape(-1), raw)
        # ... and re-encoding gives SGLang's exact string back.
        assert routes.to_sglang(spec.num_hidden_layers) == reply["meta_info"]["routed_experts"]


def test_in_process_engine_tuples_decode_like_http_lists(recorded, spec):
    """sglang.Engine.generate (0.5.17, seen on an H100) gives (logprob, token_id, None) tuples, not JSON lists."""
    case = copy.deepcopy(recorded["cases"][0])
    meta = case["reply"]["meta_info"]
    meta["output_token_logprobs"] = [tuple(e) for e in meta["output_token_logprobs"]]
    got, want = _decode(case, spec), _decode(recorded["cases"][0], spec)
    assert got.output_ids == want.output_ids and got.output_logprobs == want.output_logprobs
    assert got.routed_experts == want.routed_experts


def test_start_len_reply_holds_exactly_the_tail_rows(recorded, spec):
    full = _decode(recorded["cases"][CASE_PREFIX_CACHED], spec)
    tail = _decode(recorded["cases"][CASE_START_LEN], spec)
    start = recorded["cases"][CASE_START_LEN]["request"]["routed_experts_start_len"]
    assert tail.routed_experts.start == start and tail.routed_experts.num_tokens == full.num_tokens - 1 - start
    assert tail.routed_experts == full.routed_experts.slice(start)
    assert tail.output_ids == full.output_ids


def test_prefix_cached_rows_equal_the_rows_computed_first(recorded, spec):
    source = _decode(recorded["cases"][CASE_PREFIX_SOURCE], spec)
    cached = _decode(recorded["cases"][CASE_PREFIX_CACHED], spec)
    assert recorded["cases"][CASE_PREFIX_CACHED]["reply"]["meta_info"]["cached_tokens"] > 0
    assert cached.prompt_ids[: source.num_tokens] == source.token_ids
    assert cached.routed_experts.slice(0, source.routed_experts.end) == source.routed_experts


def test_reply_without_routes(recorded, spec):
    case = recorded["cases"][CASE_NO_ROUTES]
    assert _decode(case, spec).routed_experts is None
    with pytest.raises(ValueError, match="enable-return-routed-experts"):
        _decode(case, spec, routes_requested=True)


def test_dense_layers_are_dropped():
    spec = MoESpec("qwen2_moe", num_hidden_layers=3, moe_layers=(1, 2), num_experts=8, top_k=2)
    routes = RoutedExperts(np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]]), 8, (1, 2))
    reply = {
        "output_ids": [7, 8],
        "meta_info": {
            "finish_reason": {"type": "length", "length": 2},
            "output_token_logprobs": [[-1.0, 7, None], [-2.0, 8, None]],
            "routed_experts": routes.to_sglang(3),
        },
    }
    got = decode_reply(reply, [5], spec)
    assert got.routed_experts == routes and got.routed_experts.moe_layers == (1, 2)
    # Non-zero ids in a layer the config calls dense: the config is not the server's.
    wide = np.zeros((2, 3, 2), "<i4")
    wide[:, 0] = 3
    wide[:, 1:] = routes.to_int32()
    reply["meta_info"]["routed_experts"] = base64.b64encode(wide.tobytes()).decode()
    with pytest.raises(ValueError, match="dense"):
        decode_reply(reply, [5], spec)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["meta_info"].update(routed_experts=r["meta_info"]["routed_experts"][:-8]), "truncated"),
        (lambda r: r["meta_info"].update(routed_experts="!!!!" * 1536), "base64"),
        (lambda r: r["meta_info"].update(routed_experts=12), "base64 string"),
        (lambda r: r.update(output_ids=r["output_ids"][:-1]), "entries for 15 output tokens"),
        (lambda r: r["meta_info"].pop("output_token_logprobs"), "return_logprob"),
        (lambda r: r["meta_info"]["output_token_logprobs"][3].__setitem__(1, 999), "for token 999"),
        (lambda r: r["meta_info"].update(finish_reason=None), "finish_reason"),
        (lambda r: r["meta_info"].update(prompt_tokens=3), "prompt_tokens=3"),
        (lambda r: r.pop("meta_info"), "meta_info"),
        (lambda r: r.update(output_ids="abc"), "output_ids must be list"),
    ],
)
def test_broken_replies_raise_clear_errors(recorded, spec, mutate, message):
    case = copy.deepcopy(recorded["cases"][CASE_PREFIX_SOURCE])
    mutate(case["reply"])
    with pytest.raises(ValueError, match=message):
        _decode(case, spec)


@pytest.mark.parametrize(
    "spec_change, start_len",
    [({"num_hidden_layers": 3, "moe_layers": (0, 1, 2)}, 0), ({"top_k": 2}, 0), ({}, 5)],
)
def test_shape_disagreeing_with_config_or_start_len(recorded, spec, spec_change, start_len):
    wrong = MoESpec(**{**spec.__dict__, **spec_change})
    with pytest.raises(ValueError, match="need"):
        _decode(recorded["cases"][CASE_PREFIX_SOURCE], wrong, start_len=start_len)


def test_expert_ids_beyond_the_config_are_refused(recorded, spec):
    fewer = MoESpec(**{**spec.__dict__, "num_experts": 8})
    with pytest.raises(ValueError, match="out of range"):
        _decode(recorded["cases"][CASE_PREFIX_SOURCE], fewer)


def test_error_reply_is_reported():
    spec = MoESpec("qwen3_moe", 1, (0,), 8, 2)
    with pytest.raises(ValueError, match="boom"):
        decode_reply({"error": {"message": "boom"}}, [1], spec)


def test_finish_reasons():
    assert decode_finish_reason({"type": "length", "length": 4}) == FINISH_LENGTH
    assert decode_finish_reason({"type": "stop", "matched": 7}) == FINISH_STOP
    assert decode_finish_reason({"type": "abort", "message": "x"}) == FINISH_ABORT
    assert decode_finish_reason("stop") == FINISH_STOP
    with pytest.raises(ValueError):
        decode_finish_reason({"type": "weird"})


@pytest.mark.parametrize("reason, wire", [
    (FINISH_LENGTH, {"type": "length", "length": 3}),
    (FINISH_STOP, {"type": "stop", "matched": 29}),
    (FINISH_ABORT, {"type": "abort", "message": "aborted by the engine"}),
])
def test_served_replies_carry_each_finish_reason_and_decode_back(reason, wire):
    """What r3 serve sends for each way a request ends, in SGLang 0.5.17's shape, and the client's reading of it."""
    spec = MoESpec("qwen3_moe", 2, (0, 1), 8, 2)
    prompt, output = [3, 4], [17, 5, 29]
    routes = RoutedExperts(np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 0], [3, 2]], [[5, 4], [7, 6]]]), 8, (0, 1))
    rollout = Rollout(prompt, output, [-0.5, -0.25, -1.0], reason, routes)
    item = parse_request({"input_ids": prompt, "sampling_params": {"max_new_tokens": 3}, "return_logprob": True,
                          "return_routed_experts": True}, vocab_size=64, max_seq_len=32).items[0]
    reply = json.loads(json.dumps(build_reply(item, rollout, spec, capture=True)))  # through JSON, as on the wire
    assert reply["meta_info"]["finish_reason"] == wire
    back = decode_reply(reply, prompt, spec)
    assert (back.finish_reason, back.output_ids, back.output_logprobs) == (reason, output, [-0.5, -0.25, -1.0])
    assert back.routed_experts == routes


def test_requests_use_sglang_names_and_round_trip(recorded):
    sampling = SamplingParams(12, temperature=0.7, top_p=0.9, top_k=20, seed=3, stop_token_ids=(5,))
    body = build_request([1, 2, 3], sampling, start_len=2)
    assert body == {
        "input_ids": [1, 2, 3],
        "sampling_params": {
            "max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
            "stop_token_ids": [5], "sampling_seed": 3,
        },
        "return_logprob": True,
        "return_routed_experts": True,
        "routed_experts_start_len": 2,
    }
    parsed = parse_request(body, vocab_size=16, max_seq_len=64)
    (item,) = parsed.items
    assert (item.prompt_ids, item.sampling, item.start_len) == ([1, 2, 3], sampling, 2)
    assert item.return_routed_experts and item.return_logprob
    assert "return_routed_experts" not in build_request([1], sampling, return_routed_experts=False)
    with pytest.raises(ValueError, match="start_len"):
        build_request([1, 2], sampling, start_len=3)
    # Every request SGLang really received parses, with the same meaning.
    for case in recorded["cases"]:
        req = case["request"]
        (item,) = parse_request(req, vocab_size=512, max_seq_len=2048).items
        assert item.prompt_ids == req["input_ids"]
        assert item.start_len == req.get("routed_experts_start_len", 0)
        assert item.return_routed_experts == req.get("return_routed_experts", False)
        assert sampling_to_sglang(item.sampling).items() >= req["sampling_params"].items()


def test_batch_requests():
    body = {"input_ids": [[1, 2], [3]], "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 3}], "rid": "r"}
    parsed = parse_request(body, vocab_size=8, max_seq_len=16)
    assert parsed.is_batch and [it.sampling.max_new_tokens for it in parsed.items] == [2, 3]
    assert [it.rid for it in parsed.items] == ["r_0", "r_1"]
    with pytest.raises(ValueError, match="2 prompts"):
        parse_request({**body, "sampling_params": [{"max_new_tokens": 2}]}, vocab_size=8, max_seq_len=16)


@pytest.mark.parametrize(
    "body, message",
    [
        ([1, 2], "JSON object"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": 1}}, "input_ids"),
        ({"sampling_params": {"max_new_tokens": 1}}, "input_ids is required"),
        ({"input_ids": [], "sampling_params": {"max_new_tokens": 1}}, "non-empty"),
        ({"input_ids": "12", "sampling_params": {"max_new_tokens": 1}}, "input_ids: Input should be a valid list"),
        ({"input_ids": [1, "2"], "sampling_params": {"max_new_tokens": 1}}, r"input_ids\[1\]: .* valid integer"),
        ({"input_ids": [1, True], "sampling_params": {"max_new_tokens": 1}}, r"input_ids\[1\]: .* valid integer"),
        ({"input_ids": [[1], [2.0]], "sampling_params": {"max_new_tokens": 1}}, r"input_ids\[1\]\[0\]: .* integer"),
        ({"input_ids": [1, 99], "sampling_params": {"max_new_tokens": 1}}, "outside the vocabulary"),
        ({"input_ids": [-1], "sampling_params": {"max_new_tokens": 1}}, "outside the vocabulary"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10**9}}, "maximum sequence length"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": "4"}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {}}, "max_new_tokens is required"),
        ({"input_ids": [1], "sampling_params": "x"}, "sampling_params: Input should be a JSON object"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": None}}, "max_new_tokens is required"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "sampling_seed": 2**63}}, "seed"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "top_k": 2**63}}, "top_k"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "temperature": float("inf")}}, "finite"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "temperature": 10**400}}, "temperature"),
        ({"input_ids": None, "sampling_params": {"max_new_tokens": 1}}, "input_ids"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "routed_experts_format": "x"}, "routed_experts_format"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "temperature": "hot"}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "min_p": 0.1}}, "min_p"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "routed_experts_start_len": 5}, "start_len"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "routed_experts_start_len": 1.5}, "start_len"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "top_logprobs_num": 5}, "top_logprobs_num"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1}, "lora_path": "x"}, "lora_path"),
    ],
)
def test_bad_requests_name_the_problem(body, message):
    with pytest.raises(ValueError, match=message):
        parse_request(body, vocab_size=16, max_seq_len=64)


def test_sampling_params_from_sglang_defaults():
    assert sampling_from_sglang({"max_new_tokens": 3, "temperature": 0}) == SamplingParams(3, temperature=0)
    assert sampling_from_sglang({"max_new_tokens": 3, "skip_special_tokens": True}) == SamplingParams(3)



@pytest.mark.parametrize("wire", ["uint16", "uint8"])
def test_a_reply_naming_a_compact_dtype_decodes_to_the_same_routes(recorded, spec, wire):
    """Newer SGLang (SGLANG_ROUTED_EXPERTS_DTYPE; 0.5.17 has only int32) names its dtype in meta_info."""
    case = copy.deepcopy(recorded["cases"][CASE_PREFIX_SOURCE])
    want = _decode(case, spec).routed_experts
    meta = case["reply"]["meta_info"]
    ints = np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4")
    meta["routed_experts"] = base64.b64encode(ints.astype(np.dtype(wire).newbyteorder("<")).tobytes()).decode()
    meta["routed_experts_dtype"] = wire
    assert _decode(case, spec).routed_experts == want
    meta.pop("routed_experts_dtype")  # compact bytes read as int32: the length check names the likely cause
    with pytest.raises(ValueError, match="a dtype the reply does not name"):
        _decode(case, spec)
    meta["routed_experts_dtype"] = "float32"
    with pytest.raises(ValueError, match="routed_experts_dtype='float32'"):
        _decode(case, spec)


def test_compact_r3_replies_are_checked_like_int32_ones(recorded, spec):
    case = copy.deepcopy(recorded["cases"][CASE_PREFIX_SOURCE])
    want = _decode(case, spec).routed_experts
    meta = case["reply"]["meta_info"]
    meta.update(routed_experts=want.to_base64(), routed_experts_format="r3")
    assert _decode(case, spec).routed_experts == want
    meta["routed_experts"] = want.slice(1).to_base64()  # one row short: not the rows the request needs
    with pytest.raises(ValueError, match="but the request needs"):
        _decode(case, spec)
    blob = bytearray(base64.b64decode(want.to_base64()))
    blob[20] ^= 1  # a bit of the header's start field: caught by the v2 CRC
    meta["routed_experts"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(ValueError, match="CRC32"):
        _decode(case, spec)
    assert build_request([1], SamplingParams(1), routes_format="r3")["routed_experts_format"] == "r3"
    assert "routed_experts_format" not in build_request([1], SamplingParams(1))  # SGLang itself refuses the field
