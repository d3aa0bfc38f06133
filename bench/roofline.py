"""Measured ceilings for rollout: device copy bandwidth, bf16 matmul rate, and the bytes a step must move.

A decode step must read, at least once:

- the weights it uses: every non-expert weight (the embedding table aside: a decode step
  gathers B rows of it), and the experts that at least one token of the batch picked;
  with random routing an expert is idle with probability ``(1 - K/E)^B``, so at batch 64
  of ``bench-qwen3-moe`` about 2% of the experts stay unread and from batch 128 on none;
- the KV cache of every sequence: ``B x context x 2 x layers x kv_heads x head_dim`` elements.
  At batch 512 with 1.5K tokens of context that is 19.3 GB, more than the 15.6 GB of weights;
- the logits, written once and read once by the sampler: ``B x vocab x 4`` bytes.

Bytes over the *measured* copy bandwidth (bytes read + bytes written by a device-to-device
copy) give the floor of a step; a prefill chunk's floor is the larger of its weight reads
and its matmul FLOPs over the measured bf16 rate. ``workload_roofline`` sums both over a
whole rollout (prompt, then ``new`` decode steps as the context grows), so a measured
tok/s can be read as a share of what the card allows for exactly that workload.

Run: ``python -m bench.roofline [--model DIR] [--workload 512x512+1024 ...] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from rollout.atomic import atomic_write_text

COPY_BYTES = 1 << 30  # 1 GiB source: far past every cache, so the copy runs at DRAM speed
MATMUL_N = 8192
LOGIT_BYTES = 4  # fp32 logits, written by the lm_head and read by the sampler: 2 + 2 bytes an element at least
DEFAULT_WORKLOADS = ("64x128+64", "256x128+64", "256x256+2048", "512x512+1024")


def time_per_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn``, timed with CUDA events on CUDA (no host jitter) and a clock on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device: str | torch.device = "cuda", nbytes: int = COPY_BYTES, iters: int = 20) -> float:
    """Bytes per second moved by a device-to-device copy, counting the read and the write (CPU: 64 MiB, a smoke figure)."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes, iters = min(nbytes, 1 << 26), min(iters, 3)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / seconds


def matmul_flops(device: str | torch.device = "cuda", n: int = MATMUL_N, dtype: torch.dtype = torch.bfloat16,
                 iters: int = 20) -> float:
    """Dense ``n x n @ n x n`` FLOP/s in ``dtype`` on random data: the compute ceiling prefill approaches."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_per_call(lambda: a @ b, device, iters)
    return 2 * n**3 / seconds


def checkpoint_weight_bytes(model_dir: str | Path) -> int:
    """Bytes of all tensors in a checkpoint's safetensors files, read from their headers only."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        total += sum(end - begin for name, meta in header.items() if name != "__metadata__"
                     for begin, end in [meta["data_offsets"]])
    return total


@dataclass(frozen=True)
class ModelBytes:
    """What one token's step touches, in bytes, from the checkpoint's config (dense and MoE parts apart)."""

    weight_bytes: int  # every tensor in the checkpoint
    embed_bytes: int  # the input embedding: gathered, not read whole (0 if tied to the lm_head)
    expert_bytes: int  # all routed experts of all layers
    num_experts: int
    top_k: int
    kv_bytes_per_token: int  # K and V of one token in every layer
    vocab: int
    active_params_per_token: int  # multiply-adds per token: dense weights + top_k experts a layer

    def decode_step_bytes(self, batch: int, context: float) -> float:
        """The fewest bytes one decode step of ``batch`` sequences at ``context`` tokens of context moves."""
        return self.step_weight_bytes(batch) + batch * context * self.kv_bytes_per_token + batch * self.vocab * LOGIT_BYTES

    def step_weight_bytes(self, tokens: int) -> float:
        idle = (1 - self.top_k / self.num_experts) ** tokens  # an expert no token of the step picked
        return self.weight_bytes - self.embed_bytes - self.expert_bytes * idle


def model_bytes(model_dir: str | Path) -> ModelBytes:
    from rollout.engine.models import arch_from_config
    from rollout.moe_spec import read_config

    cfg = read_config(model_dir)
    a = arch_from_config(cfg)
    weight_bytes = checkpoint_weight_bytes(model_dir)
    params = _param_count(a)
    elem = weight_bytes / params  # bytes a parameter: the checkpoint's dtype
    expert_params = len(a.moe_layers) * a.num_experts * 3 * a.hidden_size * a.moe_intermediate_size
    embed_params = 0 if a.tie_word_embeddings else a.vocab_size * a.hidden_size
    active = params - embed_params - expert_params * (1 - a.top_k / a.num_experts)
    kv = 2 * a.num_layers * a.num_kv_heads * a.head_dim * round(elem)
    return ModelBytes(weight_bytes, round(embed_params * elem), round(expert_params * elem), a.num_experts, a.top_k,
                      kv, a.vocab_size, round(active))


def _param_count(a) -> int:
    """Parameters of a ``ModelArch`` (norms included), to turn checkpoint bytes into bytes a parameter."""
    h = a.hidden_size
    attn = h * (a.q_size + 2 * a.kv_size) + a.q_size * h + 2 * h + (2 * a.head_dim if a.qk_norm else 0)
    attn += (a.q_size + 2 * a.kv_size) if a.qkv_bias else 0
    moe = a.num_experts * 3 * h * a.moe_intermediate_size + a.num_experts * h
    if a.shared_expert_intermediate_size:
        moe += 3 * h * a.shared_expert_intermediate_size + h
    dense = 3 * h * a.dense_intermediate_size
    layers = sum(attn + (moe if i in a.moe_layers else dense) for i in range(a.num_layers))
    embed = a.vocab_size * h
    return layers + h + embed * (1 if a.tie_word_embeddings else 2)


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.prompt_len}+{self.new_tokens}"

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """``BATCHxPROMPT+NEW``, e.g. ``512x512+1024``."""
        m = re.fullmatch(r"\s*(\d+)x(\d+)\+(\d+)\s*", text)
        if not m or min(int(g) for g in m.groups()) < 1:
            raise ValueError(f"workload {text!r} is not BATCHxPROMPT+NEW with positive numbers, e.g. 512x512+1024")
        return cls(*(int(g) for g in m.groups()))


def workload_roofline(mb: ModelBytes, w: Workload, bandwidth: float, flops: float | None, chunk: int = 8192) -> dict:
    """The floor of one whole rollout: prefill in chunks of ``chunk`` tokens, then ``new - 1`` decode steps.

    The first new token comes out of the prefill; each later one is a decode step over a context one
    longer. ``flops`` None (CPU) counts bytes only.
    """
    prompt_tokens = w.batch * w.prompt_len
    chunks, prefill_s = [], 0.0
    for start in range(0, prompt_tokens, chunk):
        n = min(chunk, prompt_tokens - start)
        byte_s = mb.step_weight_bytes(n) / bandwidth
        flop_s = 2 * mb.active_params_per_token * n / flops if flops else 0.0
        prefill_s += max(byte_s, flop_s)
        chunks.append(n)
    decode_steps = w.new_tokens - 1
    # context of step s (1-based) is prompt + s; the sum over s is arithmetic
    mean_context = w.prompt_len + (decode_steps + 1) / 2
    decode_bytes = decode_steps * mb.decode_step_bytes(w.batch, mean_context)
    decode_s = decode_bytes / bandwidth
    last = mb.decode_step_bytes(w.batch, w.prompt_len + w.new_tokens) - mb.step_weight_bytes(w.batch) - w.batch * mb.vocab * LOGIT_BYTES
    return {
        "tok_s": w.batch * w.new_tokens / (prefill_s + decode_s),
        "decode_tok_s": w.batch * decode_steps / decode_s if decode_steps else None,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "step_weight_bytes": mb.step_weight_bytes(w.batch),
        "last_step_kv_bytes": last,
        "mean_step_bytes": mb.decode_step_bytes(w.batch, mean_context),
    }


def measure(model_dir: str | Path | None, workloads: list[Workload], device: str) -> dict:
    """Everything this module measures, as one JSON-ready dict."""
    result: dict = {"device": device_name(device), "copy_bandwidth_Bps": copy_bandwidth(device)}
    flops = None
    if torch.device(device).type == "cuda":
        flops = result["bf16_matmul_flops"] = matmul_flops(device)
    if model_dir is not None:
        mb = model_bytes(model_dir)
        result["model_bytes"] = asdict(mb)
        result["workloads"] = {w.name: workload_roofline(mb, w, result["copy_bandwidth_Bps"], flops) for w in workloads}
    return result


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory whose weights and KV shapes set the roofline")
    p.add_argument("--workload", nargs="+", default=list(DEFAULT_WORKLOADS), help="BATCHxPROMPT+NEW ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here as well")
    args = p.parse_args(argv)
    try:
        workloads = [Workload.parse(w) for w in args.workload]
    except ValueError as exc:
        p.error(str(exc))
    result = measure(args.model, workloads, args.device)
    print(f"device: {result['device']}")
    print(f"copy bandwidth (read + write): {result['copy_bandwidth_Bps'] / 1e12:.3f} TB/s")
    if "bf16_matmul_flops" in result:
        print(f"bf16 matmul {MATMUL_N}^3: {result['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s")
    if "model_bytes" in result:
        mb = result["model_bytes"]
        print(f"weights {mb['weight_bytes'] / 1e9:.2f} GB (experts {mb['expert_bytes'] / 1e9:.2f}, embedding "
              f"{mb['embed_bytes'] / 1e9:.2f}); KV {mb['kv_bytes_per_token'] / 1024:.1f} KiB a token")
        print(f"{'workload':<16}{'weights/step':>14}{'KV last step':>14}{'decode tok/s':>14}{'rollout tok/s':>15}")
        for name, r in result["workloads"].items():
            print(f"{name:<16}{r['step_weight_bytes'] / 1e9:>11.2f} GB{r['last_step_kv_bytes'] / 1e9:>11.2f} GB"
                  f"{r['decode_tok_s'] or 0:>14,.0f}{r['tok_s']:>15,.0f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
