"""SGLang's ``/generate`` wire format, both directions, in one place.

Field names and encodings follow SGLang's own sources, read from
``sgl-project/sglang`` (main-branch snapshot at commit ``f11d231c``):

* ``python/sglang/srt/managers/io_struct.py`` ``GenerateReqInput``: ``input_ids``
  (one list or a batch of lists), ``sampling_params``, ``return_logprob``,
  ``logprob_start_len`` (default -1: output tokens only), ``stream``,
  ``return_routed_experts`` and ``routed_experts_start_len`` ("absolute start
  position for returned routings; response covers ``[routed_experts_start_len,
  seqlen - 1)``; must be in ``[0, prompt_tokens]``").
* ``python/sglang/srt/managers/tokenizer_manager.py`` ``_handle_batch_output``:
  ``meta_info`` carries ``id``, ``finish_reason``, ``prompt_tokens``,
  ``weight_version``, ``completion_tokens``, ``cached_tokens`` and, with
  ``--skip-tokenizer-init`` (``BatchTokenIDOutput``), ``routed_experts`` as
  base64 of the raw int32 tensor bytes.

The exact reply shape was then checked against real SGLang 0.5.17 replies
(``tests/fixtures/sglang-0.5.17-tiny-qwen3-moe``): routes are base64 of
little-endian int32, flat, logical ``[seq_len - 1 - start_len,
num_hidden_layers, top_k]`` with dense layers as zeros;
``output_token_logprobs`` is ``[[logprob, token_id, null], ...]``;
``finish_reason`` is ``{"type": "length", "length": N}`` /
``{"type": "stop", "matched": id}`` / ``{"type": "abort", "message": ...}``.

Newer SGLang can send routes as ``uint16``/``uint8`` (server env
``SGLANG_ROUTED_EXPERTS_DTYPE``), naming the dtype in
``meta_info["routed_experts_dtype"]``; ``decode_reply`` reads whichever dtype the
reply names (int32 when it names none, as 0.5.17). ``r3 serve`` adds one request
field of its own, ``routed_experts_format``: ``"sglang"`` (default, the int32 form
above) or ``"r3"``, which returns ``RoutedExperts.to_base64()`` (compact
uint8/uint16 ids, MoE layers only, header and CRC32) and marks the reply with
``meta_info["routed_experts_format"] = "r3"``. ``get_model_info`` lists the
formats a server offers under ``routed_experts_formats``.

The client side (``build_request``, ``decode_reply``) serves the SGLang
backend; the server side (``parse_request``, ``build_reply``) serves
``r3 serve``. Sharing one module keeps both ends of the protocol identical.
Request bodies are validated by strict pydantic models (no coercion: a string is
not a number, a float is not a token id, NaN and infinities are refused, JSON
nested past pydantic's recursion limit is refused), then by what the engine takes.
"""

from __future__ import annotations

import math
import reprlib
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import pydantic_core
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from rollout.moe_spec import MoESpec
from rollout.routed_experts import SGLANG_WIRE_DTYPES, RoutedExperts
from rollout.types import ERROR_META_KEY, FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams

SGLANG_WIRE_VERSION = "0.5.17"  # the release whose replies the fixture recorded and r3 serve mimics
DEFAULT_WEIGHT_VERSION = "default"
# The built-in engine's Rollout.meta key for prompt tokens served from its prefix cache.
CACHED_TOKENS_META_KEY = "prefix_hit_tokens"

# Our SamplingParams field -> SGLang sampling_params key.
_SAMPLING_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop_token_ids": "stop_token_ids",
    "seed": "sampling_seed",
}
_SAMPLING_FIELDS = {theirs: ours for ours, theirs in _SAMPLING_KEYS.items()}  # the inverse, for parsing requests
_FINISH_TYPES = {"length": FINISH_LENGTH, "stop": FINISH_STOP, "abort": FINISH_ABORT}
# meta_info.routed_experts encodings: SGLang's base64 int32 of every layer, or r3's compact RoutedExperts.encode()
ROUTES_SGLANG, ROUTES_R3 = "sglang", "r3"
ROUTES_FORMATS = (ROUTES_SGLANG, ROUTES_R3)


# ---------------------------------------------------------------- client side
def sampling_to_sglang(sampling: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` for ``sampling``; unset stops and seed are left out, as SGLang's defaults."""
    out: dict[str, Any] = {}
    for ours, theirs in _SAMPLING_KEYS.items():
        value = getattr(sampling, ours)
        if ours == "stop_token_ids":
            value = list(value) or None
        if value is not None:
            out[theirs] = value
    return out


def build_request(
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    *,
    start_len: int = 0,
    return_routed_experts: bool = True,
    routes_format: str = ROUTES_SGLANG,
) -> dict[str, Any]:
    """One ``/generate`` body. Logprobs are always asked for: a ``Rollout`` carries them.

    ``routes_format="r3"`` asks an ``r3 serve`` for compact routes; send it only to a server
    whose ``get_model_info`` lists it (SGLang refuses fields it does not know).
    """
    prompt = [int(t) for t in prompt_ids]
    if not 0 <= start_len <= len(prompt):
        raise ValueError(f"start_len={start_len} must be in [0, len(prompt_ids)={len(prompt)}]")
    body: dict[str, Any] = {
        "input_ids": prompt,
        "sampling_params": sampling_to_sglang(sampling),
        "return_logprob": True,
    }
    if return_routed_experts:
        body["return_routed_experts"] = True
        if start_len:
            body["routed_experts_start_len"] = int(start_len)
        if routes_format != ROUTES_SGLANG:
            if routes_format not in ROUTES_FORMATS:
                raise ValueError(f"routes_format must be one of {ROUTES_FORMATS}, got {routes_format!r}")
            body["routed_experts_format"] = routes_format
    return body


def decode_reply(
    reply: Mapping[str, Any],
    prompt_ids: Sequence[int],
    spec: MoESpec,
    *,
    start_len: int = 0,
    routes_requested: bool = True,
) -> Rollout:
    """Turn one SGLang reply into a ``Rollout`` with compact routes (dense layers dropped).

    ``start_len`` must be the request's ``routed_experts_start_len``: SGLang's
    reply does not echo it, and the routes' first row is that absolute position.
    """
    if not isinstance(reply, Mapping):
        raise ValueError(f"SGLang reply must be a JSON object, got {type(reply).__name__}")
    if "error" in reply and "output_ids" not in reply:
        raise ValueError(f"SGLang answered with an error: {_error_message(reply)}")
    meta = _field(reply, "meta_info", Mapping, "reply")
    output_ids = _int_list(_field(reply, "output_ids", list, "reply"), "output_ids")
    prompt = [int(t) for t in prompt_ids]
    prompt_tokens = meta.get("prompt_tokens")
    if prompt_tokens is not None and prompt_tokens != len(prompt):
        raise ValueError(f"reply says prompt_tokens={prompt_tokens} but the request had {len(prompt)} prompt tokens")
    logprobs = _decode_logprobs(meta, output_ids)
    finish = decode_finish_reason(meta.get("finish_reason"))
    routes = None
    if routes_requested:
        routes = _decode_routes(meta, len(prompt) + len(output_ids), spec, start_len)
    info = {k: meta[k] for k in ("id", "cached_tokens", "weight_version", "e2e_latency") if k in meta}
    version = meta.get("weight_version")
    return Rollout(prompt, output_ids, logprobs, finish, routes, {"sglang": info},
                   weight_version=version if isinstance(version, str) else None)


def decode_finish_reason(value: Any) -> str:
    """SGLang's ``finish_reason`` object (or bare string) -> ``FINISH_*``."""
    kind = value.get("type") if isinstance(value, Mapping) else value
    if kind not in _FINISH_TYPES:
        raise ValueError(f"reply has finish_reason {value!r}; expected type one of {sorted(_FINISH_TYPES)}")
    return _FINISH_TYPES[kind]


def _decode_logprobs(meta: Mapping[str, Any], output_ids: list[int]) -> list[float]:
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise ValueError("reply has no meta_info.output_token_logprobs: the request must set return_logprob")
    if not isinstance(entries, list) or len(entries) != len(output_ids):
        n = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"output_token_logprobs has {n} entries for {len(output_ids)} output tokens")
    logprobs = []
    for i, entry in enumerate(entries):
        # over HTTP each entry is a JSON list; the in-process sglang.Engine hands back tuples
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], (int, float)):
            raise ValueError(f"output_token_logprobs[{i}] = {entry!r} is not [logprob, token_id, text]")
        if entry[1] != output_ids[i]:
            raise ValueError(
                f"output_token_logprobs[{i}] is for token {entry[1]} but output_ids[{i}] = {output_ids[i]}"
            )
        logprobs.append(float(entry[0]))
    return logprobs


def _decode_routes(meta: Mapping[str, Any], seq_len: int, spec: MoESpec, start_len: int) -> RoutedExperts:
    b64 = meta.get("routed_experts")
    if b64 is None:
        raise ValueError(
            "reply has no meta_info.routed_experts: start the SGLang server with --enable-return-routed-experts "
            "and send return_routed_experts=true"
        )
    if not isinstance(b64, str):
        raise ValueError(f"meta_info.routed_experts must be a base64 string, got {type(b64).__name__}")
    rows = seq_len - 1 - start_len
    if rows < 0:
        raise ValueError(f"routed_experts_start_len={start_len} is past the last routed position {seq_len - 1}")
    if meta.get("routed_experts_format", ROUTES_SGLANG) == ROUTES_R3:
        return _decode_r3_routes(b64, spec, start_len, rows)
    wire = meta.get("routed_experts_dtype", "int32")
    if wire not in SGLANG_WIRE_DTYPES:
        raise ValueError(f"meta_info.routed_experts_dtype={wire!r} is none of {sorted(SGLANG_WIRE_DTYPES)}")
    itemsize = SGLANG_WIRE_DTYPES[wire].itemsize
    expected_bytes = rows * spec.num_hidden_layers * spec.top_k * itemsize
    # 4 base64 characters per 3 bytes: the length check names truncation before any decoding.
    if len(b64) != 4 * math.ceil(expected_bytes / 3):
        got_bytes = len(b64) * 3 // 4 - b64[-2:].count("=")
        raise ValueError(
            f"meta_info.routed_experts holds about {got_bytes} bytes but {rows} rows "
            f"(prompt + output - 1 - start_len = {seq_len} - 1 - {start_len}) x num_hidden_layers "
            f"{spec.num_hidden_layers} x top_k {spec.top_k} x {itemsize} ({wire}) need {expected_bytes}: truncated, "
            f"a different model config, a different routed_experts_start_len, or a dtype the reply does not name"
        )
    return RoutedExperts.from_sglang(
        b64, num_experts=spec.num_experts, num_hidden_layers=spec.num_hidden_layers, top_k=spec.top_k,
        moe_layers=spec.moe_layers, start=start_len, num_tokens=rows, wire_dtype=wire,
    )


def _decode_r3_routes(b64: str, spec: MoESpec, start_len: int, rows: int) -> RoutedExperts:
    """``r3 serve``'s compact form: checked against the model and the request like the int32 one."""
    routes = RoutedExperts.from_base64(b64)
    spec.check(routes, "r3 serve routes")
    if routes.start != start_len or routes.num_tokens != rows:
        raise ValueError(
            f"r3 serve routes cover [{routes.start}, {routes.end}) but the request needs "
            f"[{start_len}, {start_len + rows})"
        )
    return routes


# ---------------------------------------------------------------- server side
@dataclass(frozen=True)
class GenerateItem:
    """One validated prompt of a ``/generate`` request."""

    prompt_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool
    return_routed_experts: bool
    start_len: int
    rid: str
    routes_format: str = ROUTES_SGLANG


@dataclass(frozen=True)
class GenerateRequest:
    items: list[GenerateItem]
    is_batch: bool
    stream: bool


def _is_batch(value: Any) -> str:
    """SGLang's rule: ``input_ids`` is a batch when it is a non-empty list of lists."""
    return "batch" if isinstance(value, list) and value and all(isinstance(x, list) for x in value) else "one"


def _per_prompt(value: Any) -> str:
    return "per_prompt" if isinstance(value, list) else "one"


_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class SGLangSamplingBody(BaseModel):
    """``sampling_params`` as r3 serve takes it: SGLang's names, ``null`` meaning "default" as in SGLang."""

    model_config = _STRICT
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    sampling_seed: int | None = None
    stop_token_ids: list[int] | None = None
    # accepted, inert without a tokenizer
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None


def _one_or_per_prompt(kind: Any) -> Any:
    """SGLang takes one value for the whole batch or a list with one per prompt."""
    return Union[
        Annotated[Union[Annotated[kind, Tag("one")], Annotated[list[kind], Tag("per_prompt")]], Discriminator(_per_prompt)],
        None,
    ]


class GenerateBody(BaseModel):
    """The ``/generate`` body: SGLang's ``GenerateReqInput`` fields that r3 serve handles, strictly typed."""

    model_config = _STRICT
    input_ids: Annotated[
        Union[Annotated[list[int], Tag("one")], Annotated[list[list[int]], Tag("batch")]], Discriminator(_is_batch)
    ]
    sampling_params: _one_or_per_prompt(SGLangSamplingBody) = None
    return_logprob: _one_or_per_prompt(bool) = None
    rid: _one_or_per_prompt(str) = None
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    routed_experts_format: Literal["sglang", "r3"] = ROUTES_SGLANG  # r3 serve only
    stream: bool = False
    log_metrics: bool = True
    # accepted only at their SGLang default
    logprob_start_len: Literal[-1] | None = None
    top_logprobs_num: Literal[0] | None = None
    return_text_in_logprobs: Literal[False] = False


_FIELD_TAGS = frozenset({"one", "batch", "per_prompt"})  # discriminator tags pydantic puts in error locations
_SHORT = reprlib.Repr()  # a bounded repr of the offending value, however large the body
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 40, 40, 4, 3, 2


def _validation_message(exc: ValidationError) -> str:
    """``input_ids[1]: Input should be a valid integer (got 2.5)``: the first few errors, by field path."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        path = ""
        for key in err["loc"]:
            if key in _FIELD_TAGS:
                continue
            path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
        got = _SHORT.repr(err.get("input"))
        where = f"{path}: " if path else ""
        detail = "" if err["type"] in ("json_invalid", "missing", "extra_forbidden") else f" (got {got})"
        message = "Input should be a JSON object" if err["type"] in ("model_type", "dict_type") else err["msg"]
        parts.append(f"{where}{message}{detail}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_request(body: Any, *, vocab_size: int, max_seq_len: int) -> GenerateRequest:
    """Validate a ``/generate`` body (raw JSON bytes or parsed JSON) as SGLang would; ``ValueError`` names the problem.

    ``max_seq_len`` bounds ``len(input_ids) + max_new_tokens`` (SGLang checks the
    same against the model's context length).
    """
    if isinstance(body, (bytes, bytearray, str)):
        try:  # pydantic's parser: bounded nesting, numbers past float range or 4300 digits refused
            body = pydantic_core.from_json(body)
        except ValueError as exc:
            raise ValueError(f"request body is not valid JSON: {exc}") from None
    return _parse_fields(body, vocab_size, max_seq_len)


def _explain(exc: ValidationError) -> str:
    errors = exc.errors()
    if any(e["loc"] and e["loc"][0] in ("text", "input_embeds") and e["type"] == "extra_forbidden" for e in errors):
        return "only input_ids are accepted: r3 serve runs without a tokenizer (like --skip-tokenizer-init)"
    if any(e["loc"] == ("input_ids",) and e["type"] == "missing" for e in errors):
        return "input_ids is required"
    unknown = [e["loc"][0] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if unknown:
        return f"unsupported request fields {sorted(unknown)}"
    return _validation_message(exc)


def _parse_fields(body: Any, vocab_size: int, max_seq_len: int) -> GenerateRequest:
    if not isinstance(body, dict):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    try:
        req = GenerateBody.model_validate(body)
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None
    is_batch = _is_batch(req.input_ids) == "batch"
    prompts = req.input_ids if is_batch else [req.input_ids]
    n = len(prompts)
    samplings = _spread(req.sampling_params, n, "sampling_params", None)
    logprob_flags = _spread(req.return_logprob, n, "return_logprob", False)
    # A single rid for a batch is a prefix, as in SGLang.
    if is_batch and isinstance(req.rid, str):
        rids = [f"{req.rid}_{i}" for i in range(n)]
    else:
        rids = _spread(req.rid, n, "rid", None)
    start_len = req.routed_experts_start_len
    items = []
    for i, prompt in enumerate(prompts):
        where = f"input_ids[{i}]" if is_batch else "input_ids"
        prompt_ids = _token_ids(prompt, where, vocab_size)
        sampling = sampling_from_sglang(samplings[i] if samplings[i] is not None else {})
        if len(prompt_ids) + sampling.max_new_tokens > max_seq_len:
            raise ValueError(
                f"{where} has {len(prompt_ids)} tokens and max_new_tokens={sampling.max_new_tokens}: "
                f"together more than the model's maximum sequence length {max_seq_len}"
            )
        if not 0 <= start_len <= len(prompt_ids):
            raise ValueError(f"routed_experts_start_len={start_len} must be in [0, {len(prompt_ids)}] for {where}")
        rid = rids[i] if rids[i] is not None else uuid.uuid4().hex
        items.append(GenerateItem(
            prompt_ids, sampling, logprob_flags[i], req.return_routed_experts, start_len, rid, req.routed_experts_format
        ))
    return GenerateRequest(items, is_batch, req.stream)


def sampling_from_sglang(params: Any) -> SamplingParams:
    """SGLang ``sampling_params`` -> ``SamplingParams``; unknown or mistyped keys are refused by name."""
    if isinstance(params, SGLangSamplingBody):
        checked = params
    elif not isinstance(params, dict):
        raise ValueError(f"sampling_params must be an object, got {type(params).__name__}")
    else:
        try:
            checked = SGLangSamplingBody.model_validate(params)
        except ValidationError as exc:
            unknown = sorted(e["loc"][0] for e in exc.errors() if e["type"] == "extra_forbidden")
            if unknown:
                raise ValueError(f"unsupported sampling_params {unknown}; supported: {sorted(_SAMPLING_FIELDS)}") from None
            raise ValueError(f"sampling_params.{_validation_message(exc)}") from None
    if checked.max_new_tokens is None:
        raise ValueError("sampling_params.max_new_tokens is required")
    kwargs = {ours: getattr(checked, theirs) for theirs, ours in _SAMPLING_FIELDS.items()}
    try:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:
        raise ValueError(f"sampling_params: {exc}") from None


def build_reply(
    item: GenerateItem,
    rollout: Rollout,
    spec: MoESpec,
    *,
    capture: bool,
    e2e_latency: float = 0.0,
) -> dict[str, Any]:
    """An SGLang 0.5.17 reply (same keys, same order) for one finished item."""
    cached = int(rollout.meta.get(CACHED_TOKENS_META_KEY, 0))
    version = DEFAULT_WEIGHT_VERSION if rollout.weight_version is None else str(rollout.weight_version)
    reply = _reply(item, rollout.output_ids, rollout.output_logprobs, finish_reason_to_sglang(rollout), cached, version)
    meta = reply["meta_info"]
    if capture and item.return_routed_experts:
        routes = rollout.routed_experts
        if routes is None:
            raise RuntimeError("the engine returned no routes although capture is on")
        if routes.start != item.start_len or routes.end != rollout.num_tokens - 1:
            raise RuntimeError(
                f"engine routes cover [{routes.start}, {routes.end}) but the reply needs "
                f"[{item.start_len}, {rollout.num_tokens - 1})"
            )
        spec.check(routes, "engine routes")
        if item.routes_format == ROUTES_R3:
            meta["routed_experts"] = routes.to_base64()
            meta["routed_experts_format"] = ROUTES_R3
        else:
            meta["routed_experts"] = routes.to_sglang(spec.num_hidden_layers)
    meta.update(dp_rank=None, e2e_latency=e2e_latency, response_sent_to_client_ts=time.time())
    return reply


def build_partial_reply(
    item: GenerateItem, output_ids: Sequence[int], logprobs: Sequence[float], weight_version: str = DEFAULT_WEIGHT_VERSION
) -> dict[str, Any]:
    """A streamed chunk before the end: cumulative tokens, ``finish_reason`` null, no routes yet (as SGLang)."""
    reply = _reply(item, output_ids, logprobs, None, 0, weight_version)
    reply["meta_info"]["dp_rank"] = None
    return reply


def _reply(
    item: GenerateItem, output_ids: Sequence[int], logprobs: Sequence[float], finish: dict[str, Any] | None, cached: int,
    weight_version: str,
) -> dict[str, Any]:
    ids = [int(t) for t in output_ids]
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": finish,
        "prompt_tokens": len(item.prompt_ids),
        "weight_version": weight_version,
        "num_retractions": 0,
    }
    if item.return_logprob:
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[float(lp), t, None] for lp, t in zip(logprobs, ids)]
        meta["output_token_logprobs_length"] = len(ids)
    meta.update(
        reasoning_tokens=0,
        completion_tokens=len(ids),
        cached_tokens=cached,
        cached_tokens_details={"device": cached, "host": 0} if cached else None,
    )
    return {"output_ids": ids, "meta_info": meta}


def finish_reason_to_sglang(rollout: Rollout) -> dict[str, Any]:
    if rollout.finish_reason == FINISH_LENGTH:
        return {"type": "length", "length": len(rollout.output_ids)}
    if rollout.finish_reason == FINISH_STOP:
        return {"type": "stop", "matched": int(rollout.output_ids[-1]) if rollout.output_ids else None}
    return {"type": "abort", "message": str(rollout.meta.get(ERROR_META_KEY, "aborted by the engine"))}


def error_body(message: str) -> dict[str, Any]:
    """SGLang's error shape: ``{"error": {"message": ...}}``."""
    return {"error": {"message": message}}


# ------------------------------------------------------------------- helpers
def _error_message(reply: Mapping[str, Any]) -> str:
    err = reply.get("error")
    return str(err.get("message", err)) if isinstance(err, Mapping) else str(err)


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where} has no {key!r}")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{where}.{key} must be {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _int_list(values: list, what: str) -> list[int]:
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{what} must be a list of integers")
    return list(values)


def _spread(value: Any, n: int, what: str, default: Any) -> list[Any]:
    """One value for the whole batch, or a list with one per prompt (its length checked)."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _token_ids(prompt: list[int], where: str, vocab_size: int) -> list[int]:
    if not prompt:
        raise ValueError(f"{where} must be a non-empty list of token ids")
    for j, t in enumerate(prompt):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{where}[{j}] = {t} is outside the vocabulary [0, {vocab_size})")
    return list(prompt)
