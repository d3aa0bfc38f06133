"""``r3 serve`` (subprocess, 127.0.0.1) driven by the SGLang HTTP backend, on the checkpoint real SGLang recorded.

Agreement with the in-process engine, SGLang's reply shape, multi-turn with
start_len, concurrent load checked by recomputing routes with transformers, and
bad input that must be answered with a 4xx while the server keeps serving.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from rollout import RolloutWorker
from rollout.moe_spec import MoESpec
from rollout.sglang.backend import SGLangBackend
from rollout.sglang.multiturn import RESPONSE_MASK_KEY, continuation_request, continue_rollout
from rollout.types import FINISH_LENGTH, SamplingParams

GREEDY = SamplingParams(6, temperature=0)


@pytest.fixture(scope="module")
def server(start_serve, sglang_fixture):
    return start_serve(sglang_fixture)


@pytest.fixture(scope="module")
def worker(sglang_fixture):
    with RolloutWorker(sglang_fixture, device="cpu", dtype="float32") as w:
        yield w


@pytest.fixture(scope="module")
def backend(server):
    with SGLangBackend(url=server.url, model_path=server.model) as b:
        yield b


@pytest.fixture(scope="module")
def recorded(sglang_fixture):
    return json.loads((sglang_fixture / "replies.json").read_text())


def _prompts(n, seed, low=4, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, int(rng.integers(low, high))).tolist() for _ in range(n)]


def _post(url, path, body, headers=None, method="POST"):
    """One raw request on a fresh connection: (status, parsed JSON or raw text)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(raw) if ctype.startswith("application/json") else raw)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(8, temperature=0.8, top_p=0.9, top_k=50, seed=3)])
def test_http_backend_equals_in_process_engine(backend, worker, sampling):
    prompts = _prompts(4, seed=sampling.max_new_tokens)
    served = backend.generate(prompts, sampling)
    local = worker.generate(prompts, sampling)
    for s, l in zip(served, local):
        assert s.prompt_ids == l.prompt_ids
        assert s.output_ids == l.output_ids
        assert s.finish_reason == l.finish_reason == FINISH_LENGTH
        assert s.routed_experts == l.routed_experts
        # Batch composition differs (the server batches concurrent requests its own way): float noise only.
        np.testing.assert_allclose(s.output_logprobs, l.output_logprobs, rtol=0, atol=1e-5)


def test_replies_have_the_shape_and_fields_of_real_sglang(server, recorded):
    for i, case in enumerate(recorded["cases"]):
        status, ours = _post(server.url, "/generate", case["request"])
        assert status == 200, (i, ours)
        theirs = case["reply"]
        assert list(ours) == list(theirs), i
        assert list(ours["meta_info"]) == list(theirs["meta_info"]), i
        for key, value in theirs["meta_info"].items():
            if value is not None and key != "cached_tokens_details":
                assert type(ours["meta_info"][key]) is type(value), (i, key)
        assert len(ours["output_ids"]) == len(theirs["output_ids"])
        assert ours["meta_info"]["finish_reason"] == theirs["meta_info"]["finish_reason"]
        assert ours["meta_info"]["prompt_tokens"] == theirs["meta_info"]["prompt_tokens"]
        ours_lp, theirs_lp = ours["meta_info"]["output_token_logprobs"], theirs["meta_info"]["output_token_logprobs"]
        assert len(ours_lp) == len(theirs_lp)
        assert all(len(e) == 3 and e[2] is None and e[1] == t for e, t in zip(ours_lp, ours["output_ids"]))
        if "routed_experts" in theirs["meta_info"]:
            ours_b, theirs_b = (base64.b64decode(r["meta_info"]["routed_experts"]) for r in (ours, theirs))
            assert len(ours_b) == len(theirs_b), i  # same rows x layers x top_k int32


def test_multi_turn_start_len_returns_exactly_the_new_rows(backend):
    first = backend.generate(_prompts(1, seed=5), GREEDY)[0]
    injected = [7, 8, 9]
    prompt, start = continuation_request(first, injected)
    assert start == first.num_tokens - 1
    merged = continue_rollout(first, injected, GREEDY, backend)
    whole = backend.generate([prompt], GREEDY)[0]  # the same conversation as one request, all rows
    turn_routes = merged.routed_experts.slice(start)
    assert turn_routes.num_tokens == len(prompt) + GREEDY.max_new_tokens - 1 - start
    assert turn_routes == whole.routed_experts.slice(start)
    assert merged.routed_experts == whole.routed_experts
    assert merged.token_ids == whole.token_ids
    assert merged.meta[RESPONSE_MASK_KEY].count(0) == len(injected)
    # A third turn keeps appending.
    third = continue_rollout(merged, [1, 2], GREEDY, backend)
    again = backend.generate([merged.token_ids + [1, 2]], GREEDY)[0]
    assert third.routed_experts == again.routed_experts and third.meta["turns"] == 3


def test_concurrent_clients_get_their_own_routes(server, worker, sglang_fixture):
    """4 clients x 3 requests at once; every reply is checked against a transformers forward of its own tokens."""
    clients, per_client = 4, 3
    jobs = {
        (c, j): (
            _prompts(1, seed=100 + 10 * c + j)[0],
            SamplingParams(4 + (c + j) % 6, temperature=0 if j % 2 else 1.0, seed=c * 10 + j),
        )
        for c in range(clients)
        for j in range(per_client)
    }
    results, errors = {}, []

    def client(c):
        try:
            with SGLangBackend(url=server.url, model_path=server.model, concurrency=1) as b:
                for j in range(per_client):
                    prompt, sampling = jobs[c, j]
                    results[c, j] = b.generate([prompt], sampling)[0]
        except Exception as exc:  # surfaced below with the failing client
            errors.append((c, exc))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert set(results) == set(jobs)

    from transformers import AutoModelForCausalLM

    spec = MoESpec.from_pretrained(sglang_fixture)
    hf = AutoModelForCausalLM.from_pretrained(sglang_fixture, dtype=torch.float32)
    recomputed = {}
    with torch.no_grad():
        for key, r in results.items():
            out = hf(torch.tensor([r.token_ids[:-1]]), output_router_logits=True)
            top = torch.stack([lg.topk(spec.top_k, dim=-1).indices for lg in out.router_logits], dim=1)
            recomputed[key] = np.sort(top.numpy(), -1)
    for key, r in results.items():
        prompt, sampling = jobs[key]
        assert r.prompt_ids == prompt and len(r.output_ids) == sampling.max_new_tokens
        mine = np.sort(r.routed_experts.ids, -1)
        assert np.array_equal(mine, recomputed[key]), key
        for other, theirs in recomputed.items():
            if other != key and theirs.shape == mine.shape:
                assert not np.array_equal(mine, theirs)
    # Tokens too: the same (prompt, sampling) in the in-process engine.
    keys = sorted(jobs)
    local = worker.generate([jobs[k][0] for k in keys], [jobs[k][1] for k in keys])
    assert [results[k].output_ids for k in keys] == [r.output_ids for r in local]


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "recursion limit"),  # deep nesting: no RecursionError, no dropped connection
    ({"input_ids": "hello", "sampling_params": {"max_new_tokens": 2}}, 400, "input_ids: Input should be a valid list"),
    ({"input_ids": [1, 2.5], "sampling_params": {"max_new_tokens": 2}}, 400, "input_ids[1]: Input should be a valid integer"),
    ({"input_ids": [1, 512], "sampling_params": {"max_new_tokens": 2}}, 400, "outside the vocabulary"),
    ({"input_ids": [1, -3], "sampling_params": {"max_new_tokens": 2}}, 400, "outside the vocabulary"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**9}}, 400, "maximum sequence length"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**12}}, 400, "max_new_tokens must be an integer in"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": None}}, 400, "max_new_tokens is required"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": "warm"}}, 400, "temperature"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": 1' + b"0" * 400 + b"}}",
     400, "sampling_params.temperature"),  # 1e400 as a JSON integer
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": 1e400}}', 400, "finite number"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "top_p": NaN}}', 400, "finite number"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "sampling_seed": 2**63}}, 400, "seed must be"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "top_k": 2**63}}, 400, "top_k must be"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1' + b"0" * 5000 + b"}}", 400, "not valid JSON"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": "yes"}, 400, "boolean"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "routed_experts_start_len": 3}, 400, "start_len"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "stream": None}, 400, "stream"),
    ({"input_ids": None, "sampling_params": {"max_new_tokens": 2}}, 400, "input_ids"),
    ({"text": "hello", "sampling_params": {"max_new_tokens": 2}}, 400, "input_ids"),
    ([1, 2, 3], 400, "JSON object"),
    (b"", 400, "not valid JSON"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_input_gets_4xx_and_the_server_keeps_serving(server, body, status, message):
    got, reply = _post(server.url, "/generate", body)
    assert got == status and message in reply["error"]["message"]
    ok, good = _post(server.url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    assert ok == 200 and len(good["output_ids"]) == 2


def test_oversized_missing_length_and_unknown_paths(server):
    parsed = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders(b"{")  # the server must answer without reading 64 MiB
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]["message"]
    conn.close()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411
    conn.close()
    assert _post(server.url, "/nope", {"x": 1})[0] == 404
    assert _post(server.url, "/nope", None, method="GET")[0] == 404
    assert _post(server.url, "/generate", {"input_ids": [3], "sampling_params": {"max_new_tokens": 1}})[0] == 200


def test_batch_stream_health_and_model_info(server, backend):
    prompts = _prompts(3, seed=9)
    status, batch = _post(
        server.url, "/generate",
        {"input_ids": prompts, "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "return_logprob": True},
    )
    assert status == 200 and isinstance(batch, list) and len(batch) == 3
    singles = backend.generate(prompts, SamplingParams(5, temperature=0))
    assert [b["output_ids"] for b in batch] == [s.output_ids for s in singles]
    assert all("routed_experts" not in b["meta_info"] for b in batch)  # not requested

    status, text = _post(
        server.url, "/generate",
        {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "stream": True,
         "return_logprob": True, "return_routed_experts": True},
    )
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for partial in chunks[:-1]:
        assert partial["meta_info"]["finish_reason"] is None and "routed_experts" not in partial["meta_info"]
        assert partial["output_ids"] == singles[0].output_ids[: len(partial["output_ids"])]
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths == sorted(lengths) and lengths[-1] == 5
    last = chunks[-1]
    assert last["output_ids"] == singles[0].output_ids and last["meta_info"]["finish_reason"]["type"] == "length"
    assert base64.b64decode(last["meta_info"]["routed_experts"]) == base64.b64decode(
        singles[0].routed_experts.to_sglang(4)
    )
    status, reply = _post(server.url, "/generate", {"input_ids": prompts, "sampling_params": {"max_new_tokens": 2},
                                                    "stream": True})
    assert status == 400 and "single prompt" in reply["error"]["message"]

    assert _post(server.url, "/health", None, method="GET")[0] == 200
    status, info = _post(server.url, "/get_model_info", None, method="GET")
    assert status == 200 and info["is_generation"] is True and info["model_type"] == "qwen3_moe"
    assert backend.health()


def _bench_module():
    path = Path(__file__).resolve().parents[3] / "bench" / "sglang_real_check.py"
    spec = importlib.util.spec_from_file_location("sglang_real_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_check_script_against_r3_serve(server, tmp_path):
    bench = _bench_module()
    out = tmp_path / "check.json"
    args = ["--url", server.url, "--model", str(server.model), "--prompts", "2", "--max-new-tokens", "6"]
    assert bench.main(args + ["--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["ok"] is True
    assert summary["multi_turn"]["concat_equals_whole"] is True
    assert summary["prefix_cache"]["prefix_rows_equal"] and summary["prefix_cache"]["cached_tokens"] > 0
    assert summary["builtin_comparison"]["greedy_sequences_identical"] == "2/2"
    assert summary["builtin_comparison"]["route_row_agreement_teacher_forced"] == 1.0
    bench_out = tmp_path / "bench.json"
    bench_args = ["--http-bench", "--requests", "4", "--concurrency", "2", "--prompt-len", "8", "--rounds", "1"]
    bench_args += ["--out", str(bench_out)]
    assert bench.main(args + bench_args) == 0
    report = json.loads(bench_out.read_text())
    for mode in ("routes_on", "routes_off"):
        assert report[mode]["output_tokens"] == 4 * 6 and report[mode]["output_tok_per_s"] > 0


def test_rollout_worker_dispatches_to_the_sglang_backend(server, backend):
    """``RolloutWorker(engine="sglang", url=...)``; the route shape comes from the served model's config."""
    prompts = _prompts(2, seed=21)
    samplings = [GREEDY, SamplingParams(4, temperature=1.0, seed=5)]  # one per prompt
    with RolloutWorker(engine="sglang", url=server.url) as w:
        assert isinstance(w.backend, SGLangBackend) and w.backend.spec == backend.spec
        got = w.generate(prompts, samplings)
    want = [backend.generate([p], s)[0] for p, s in zip(prompts, samplings)]
    assert [len(g.output_ids) for g in got] == [6, 4]
    assert [g.output_ids for g in got] == [x.output_ids for x in want]
    assert [g.routed_experts for g in got] == [x.routed_experts for x in want]


def test_rollout_worker_refuses_builtin_only_settings_for_sglang(server):
    """device/dtype/overlap are the SGLang server's launch settings: refused, not silently dropped."""
    with pytest.raises(ValueError, match=r"does not take \['device', 'overlap'\]"):
        RolloutWorker(engine="sglang", url=server.url, device="cuda", overlap=False)
