"""Measured ceilings for decode: device copy bandwidth, bf16 matmul rate, and the decode roofline.

Decode at moderate batch is bound by reading the weights: each step reads every
weight once and yields one token per sequence. The roofline used across this
project (issue 8) is therefore ``batch / (weight_bytes / copy_bandwidth)`` with
the bandwidth *measured* on the card (bytes read + bytes written by a
device-to-device copy), not the datasheet figure.

Run: ``python -m bench.roofline [--model DIR] [--batch 64 256] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path
from typing import Callable

import torch

from rollout.atomic import atomic_write_text

COPY_BYTES = 1 << 30  # 1 GiB source: far past every cache, so the copy runs at DRAM speed
MATMUL_N = 8192


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
    """Bytes per second moved by a device-to-device copy, counting the read and the write."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / seconds


def matmul_flops(device: str | torch.device = "cuda", n: int = MATMUL_N, dtype: torch.dtype = torch.bfloat16,
                 iters: int = 20) -> float:
    """Dense ``n x n @ n x n`` FLOP/s in ``dtype``: the compute ceiling prefill approaches."""
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


def decode_roofline_tok_s(batch: int, weight_bytes: int, bandwidth: float) -> float:
    """Tokens per second if every decode step did nothing but read all weights once."""
    return batch * bandwidth / weight_bytes


def measure(model_dir: str | Path | None, batches: list[int], device: str) -> dict:
    """Everything this module measures, as one JSON-ready dict."""
    result: dict = {"device": device_name(device), "copy_bandwidth_Bps": copy_bandwidth(device)}
    if torch.device(device).type == "cuda":
        result["bf16_matmul_flops"] = matmul_flops(device)
    if model_dir is not None:
        weight_bytes = checkpoint_weight_bytes(model_dir)
        result["weight_bytes"] = weight_bytes
        result["roofline_tok_s"] = {str(b): decode_roofline_tok_s(b, weight_bytes, result["copy_bandwidth_Bps"])
                                    for b in batches}
    return result


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory whose weight bytes set the roofline")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here as well")
    args = p.parse_args(argv)
    result = measure(args.model, args.batch, args.device)
    print(f"device: {result['device']}")
    print(f"copy bandwidth (read + write): {result['copy_bandwidth_Bps'] / 1e12:.3f} TB/s")
    if "bf16_matmul_flops" in result:
        print(f"bf16 matmul {MATMUL_N}^3: {result['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s")
    if "weight_bytes" in result:
        print(f"weights: {result['weight_bytes'] / 1e9:.2f} GB")
        for b, tok_s in result["roofline_tok_s"].items():
            print(f"decode roofline, batch {b}: {tok_s:,.0f} tok/s")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
