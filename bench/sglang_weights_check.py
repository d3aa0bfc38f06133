"""The SGLang backend's RL verbs against a real SGLang server (0.5.17) on the GPU machine.

``python -m bench.sglang_weights_check [--sglang-site /tmp/sglang-site] [--out DIR]``. Makes two
tiny random Qwen3-MoE checkpoints (A: seed 0, B: seed 1; head_dim 128, which SGLang's kernels
need), starts ``python -m sglang.launch_server`` on A in a child process (its own session,
``PYTHONPATH`` = the unpacked SGLang site), and checks through ``SGLangBackend``:

* ``weight_version`` from ``/model_info`` (SGLang says "default" at start);
* ``update_weights(trainer state_dict of B, 1)``: tensors checked, staged as safetensors,
  loaded by ``/update_weights_from_disk``; replies carry ``weight_version`` "1";
* ``update_weights_from_disk(B, 2)`` gives the same greedy tokens and routes as the tensor path;
* ``update_weights_from_disk(A, 3)`` gives back A's first greedy tokens and routes exactly
  (so the update replaced every weight and the radix cache held nothing of B);
* a partial update (one layer's fused experts) is accepted; a bad path is refused (400) and the
  server keeps its version and keeps serving;
* ``flush_cache``, ``pause_generation`` (``abort`` while a request runs, ``retract``),
  ``continue_generation``; ``release_memory``/``resume_memory`` (SGLang needs
  ``--enable-memory-saver`` for them: pass ``--memory-saver`` to start the server with it);
* greedy agreement of SGLang on B with the built-in engine on B (bf16), for information.

Writes ``sglang_weights_check.json`` and prints a table; exit status 1 if a hard check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rollout.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(  # the shape of the recorded SGLang fixture: head_dim 128, 16 experts, top-4
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=512,
    moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4, num_hidden_layers=4, vocab_size=512,
    max_position_embeddings=2048, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
PROMPTS = [[5, 17, 300, 42, 7, 99, 123, 4], [250, 11, 3, 480, 9, 1, 2, 3], list(range(1, 33)), [7] * 12]


def make_checkpoints(root: Path) -> tuple[Path, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **CONFIG), dtype=torch.bfloat16)
        path = root / f"qwen3-moe-hd128-seed{seed}"
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def start_server(model: Path, site: str, port: int, memory_saver: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--skip-tokenizer-init",
           "--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
           "--enable-return-routed-experts", "--mem-fraction-static", "0.3", "--host", "127.0.0.1", "--port", str(port)]
    if memory_saver:
        cmd.append("--enable-memory-saver")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(REPO)]))
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    from rollout.sglang.http_client import HTTPClient

    client = HTTPClient(url, timeout=10, max_retries=0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the SGLang server exited with {proc.returncode} before it was healthy")
            try:
                client.get_json("/health")
                return
            except Exception:
                time.sleep(2)
        raise RuntimeError(f"the SGLang server was not healthy within {timeout:.0f}s")
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _greedy(backend) -> list:
    """One prompt at a time: a batch's composition changes bf16 numerics, so comparisons need batches of one."""
    from rollout.types import SamplingParams

    return [backend.generate([p], SamplingParams(max_new_tokens=16, temperature=0))[0] for p in PROMPTS]


def _same(a, b) -> bool:
    return all(x.output_ids == y.output_ids and np.array_equal(x.routed_experts.ids, y.routed_experts.ids)
               for x, y in zip(a, b))


def checks(url: str, a: Path, b: Path) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    from rollout.sglang.backend import SGLangBackend
    from rollout.types import SamplingParams

    results: list[dict[str, Any]] = []

    def record(name: str, hard: bool, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            value = fn()
            ok = value is not False
            results.append({"check": name, "hard": hard, "ok": ok, "seconds": time.perf_counter() - start,
                            **({"value": value} if isinstance(value, (str, int, float, bool)) else {})})
            return value
        except Exception as exc:  # a failed check is reported; the next one still runs
            results.append({"check": name, "hard": hard, "ok": False, "error": repr(exc)[:500]})
            return None

    backend = SGLangBackend(url=url, model_path=a, timeout=300)
    trainer_b = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    try:
        record("initial weight_version (a string)", True, lambda: backend.weight_version)
        first = _greedy(backend)
        record("update_weights(state_dict of B, 1)", True, lambda: backend.update_weights(trainer_b, version=1))
        record("weight_version is '1'", True, lambda: backend.weight_version == "1")
        via_tensors = _greedy(backend)
        record("replies carry weight_version '1'", True, lambda: all(r.weight_version == "1" for r in via_tensors))
        record("B differs from A", True, lambda: not _same(via_tensors, first))
        record("update_weights_from_disk(B, 2)", True, lambda: backend.update_weights_from_disk(b, version=2))
        record("disk path == tensor path (tokens, routes)", True, lambda: _same(_greedy(backend), via_tensors))
        record("update_weights_from_disk(A, 3)", True, lambda: backend.update_weights_from_disk(a, version=3))
        record("A again == A's first replies (tokens, routes)", True, lambda: _same(_greedy(backend), first))
        partial = {k: v for k, v in trainer_b.items() if k.startswith("model.layers.0.mlp.experts.")}
        record("partial update (layer 0 fused experts)", True, lambda: backend.update_weights(partial, version=4))
        record("a bad path is refused", True, lambda: _refused(lambda: backend.update_weights_from_disk(a / "nope", 5)))
        record("version kept after the refusal", True, lambda: backend.weight_version == "4")
        record("still serving", True, lambda: len(_greedy(backend)) == len(PROMPTS))
        record("flush_cache (idle)", True, backend.flush_cache)
        record("pause(abort) while a request runs", False, lambda: _pause_abort(backend))
        record("continue_generation", True, backend.continue_generation)
        record("pause(retract) + continue", True, lambda: (backend.pause_generation("retract"), backend.continue_generation()))
        record("release_memory(weights=True)", False, lambda: backend.release_memory(weights=True))
        record("resume_memory", False, backend.resume_memory)
        record("serving after the memory cycle", False, lambda: len(_greedy(backend)) == len(PROMPTS))
        record("update_weights_from_disk(B, 6)", True, lambda: backend.update_weights_from_disk(b, version=6))
        record("SGLang on B vs built-in engine on B (greedy token agreement)", False,
               lambda: _builtin_agreement(b, _greedy(backend), SamplingParams(max_new_tokens=16, temperature=0)))
    finally:
        backend.close()
    return results


def _refused(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except ValueError:
        return True
    return False


def _pause_abort(backend) -> str:
    from rollout.types import SamplingParams

    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", backend.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1500, temperature=1.0))[0]))
    thread.start()
    time.sleep(0.5)
    backend.pause_generation("abort")
    thread.join(120)
    r = out.get("r")
    return "no reply" if r is None else f"{r.finish_reason} after {len(r.output_ids)} tokens"


def _builtin_agreement(b: Path, sglang_rollouts, sampling) -> float:
    from rollout.engine.engine import Engine

    engine = Engine(b, device="cuda" if torch.cuda.is_available() else "cpu", dtype="bfloat16")
    ours = engine.generate(PROMPTS, sampling)
    same = sum(x == y for r, s in zip(ours, sglang_rollouts) for x, y in zip(r.output_ids, s.output_ids))
    return same / sum(len(r.output_ids) for r in ours)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sglang-site", default=os.environ.get("SGLANG_SITE", "/tmp/sglang-site"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--memory-saver", action="store_true", help="start SGLang with --enable-memory-saver")
    p.add_argument("--start-timeout", type=float, default=240)
    args = p.parse_args(argv)
    if not (Path(args.sglang_site) / "sglang").is_dir():
        print(f"sglang_weights_check: no SGLang at {args.sglang_site} (see ../shared/tools/sglang-on-gpu)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="r3-sglang-weights-") as tmp:
        a, b = make_checkpoints(Path(tmp))
        port = _free_port()
        proc = start_server(a, args.sglang_site, port, args.memory_saver)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, args.start_timeout)
            results = checks(url, a, b)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    summary = {"results": results, "memory_saver": args.memory_saver,
               "ok": all(r["ok"] for r in results if r["hard"])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "sglang_weights_check.json", json.dumps(summary, indent=2) + "\n")
    for r in results:
        detail = r.get("error") or r.get("value", "")
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {'hard' if r['hard'] else 'info'} {r['check']:60} {str(detail)[:90]}")
    print(f"ok: {summary['ok']}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
