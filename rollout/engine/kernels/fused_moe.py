"""Fused MoE experts: (token, expert) pairs laid out by expert in blocks, two Triton GEMMs, a fixed-order sum.

At decode the experts are bound by reading their weights (``bench-qwen3-moe``: 1.21 GB a
layer, 14.5 of the 16.2 GB a step reads). The kernels here read each active expert's
weights once per block of up to ``block_m`` pairs and keep every intermediate small:

1. **Layout** (three tiny kernels, no host sync): each pair takes a rank within its expert
   (an atomic counter), each expert's run is padded to a multiple of ``block_m``, and
   ``sorted_pairs`` lists the pair ids block by block (``num_pairs`` marks padding);
   ``block_expert`` names each block's expert (-1 past the end: those programs exit).
2. **gate_up + SiLU * up**: one program computes the gate and the up tile of the same
   columns and writes ``silu(gate) * up`` (``[pairs, I]``), so the ``[pairs, 2I]`` product
   never reaches memory.
3. **down**: ``act @ down[e]^T`` times the pair's routing weight, written to the pair's own row.
4. **Top-k sum**: ``out[t] = sum_k pairs[t * K + k]`` in a fixed order, with no atomics.

Every output row is computed from its own inputs in an order fixed by the kernel config
alone: where a pair sits inside a block (which the atomic ranks make run-dependent) and
which other tokens share the batch do not change its bits. The config is looked up by the
number of tokens (``config_for``) on power-of-two keys, which are also CUDA-graph batch
sizes, so a graph padded to its bucket and the eager step it replaces use the same config.

Configs: a tuned table (``bench/kernels_microbench.py --tune`` writes one per device and shape) is
found through ``tuned.find_config``; without one, ``default_config``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from rollout.engine.kernels.tuned import device_tag, find_config

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine keeps its torch experts
    triton = None

MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
# table keys: powers of two, each also a decode-graph batch size (see cuda_graph.graph_batch_sizes)
CONFIG_KEYS = tuple(1 << i for i in range(15))
_LAYOUT_BLOCK = 1024  # pairs per program of the layout kernels


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoEConfig:
    """One kernel configuration: the pair-block height shared by both GEMMs, and each GEMM's tiles."""

    block_m: int
    up: GemmConfig
    down: GemmConfig

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MoEConfig":
        try:
            cfg = cls(int(data["block_m"]), GemmConfig(**data["up"]), GemmConfig(**data["down"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad fused-MoE config {data!r}: {exc}") from None
        for size in (cfg.block_m, cfg.up.block_n, cfg.up.block_k, cfg.down.block_n, cfg.down.block_k):
            if size < MIN_DOT or size & (size - 1):
                raise ValueError(f"bad fused-MoE config {data!r}: block sizes must be powers of two >= {MIN_DOT}")
        return cfg


@dataclass(frozen=True)
class MoEShape:
    num_experts: int
    hidden: int
    inter: int
    top_k: int
    dtype: str  # "bfloat16", ...

    def file_name(self, device: str) -> str:
        """``device`` as ``tuned.device_tag`` spells it."""
        return f"fused_moe_E{self.num_experts}_H{self.hidden}_I{self.inter}_K{self.top_k}_{self.dtype}_{device}.json"


def default_config(num_tokens: int, shape: MoEShape) -> MoEConfig:
    """A config from the shape alone: small blocks while decode is bound by weight reads, large for prefill."""
    rows_per_expert = num_tokens * shape.top_k / shape.num_experts
    if rows_per_expert <= 24:
        return MoEConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(128, 128, 4, 3))
    if rows_per_expert <= 48:
        return MoEConfig(32, GemmConfig(64, 128, 4, 3), GemmConfig(128, 64, 4, 3))
    if rows_per_expert <= 96:
        return MoEConfig(64, GemmConfig(64, 64, 4, 3), GemmConfig(128, 64, 4, 3))
    return MoEConfig(128, GemmConfig(64, 64, 8, 3), GemmConfig(128, 64, 8, 3))


def table_key(num_tokens: int) -> int:
    """The smallest config key >= ``num_tokens`` (the largest key beyond the table)."""
    return next((k for k in CONFIG_KEYS if k >= num_tokens), CONFIG_KEYS[-1])


def config_for(num_tokens: int, shape: MoEShape, device: str) -> MoEConfig:
    table = load_table(shape, device)
    key = table_key(num_tokens)
    return table.get(key) or default_config(key, shape)


@lru_cache(maxsize=None)
def load_table(shape: MoEShape, device: str) -> dict[int, MoEConfig]:
    """The tuned table for this shape and device (``tuned.find_config``); {} if there is none."""
    path = find_config(shape.file_name(device))
    return parse_table(path.read_text(), str(path)) if path is not None else {}


def parse_table(text: str, source: str) -> dict[int, MoEConfig]:
    try:
        raw = json.loads(text)
        table = {int(k): MoEConfig.from_json(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{source}: not a fused-MoE config table ({exc})") from None
    bad = sorted(k for k in table if k not in CONFIG_KEYS)
    if bad:
        raise ValueError(f"{source}: keys must be powers of two up to {CONFIG_KEYS[-1]}, got {bad}")
    return table


def fit(config: MoEConfig, shape: MoEShape) -> MoEConfig:
    """Tiles no larger than the (power-of-two-rounded) matrix, so tiny models keep tiny programs; float32
    halves ``block_k`` so a stage of tiles takes the shared memory a 16-bit one does."""
    def clamp(size: int, dim: int) -> int:
        return max(MIN_DOT, min(size, triton.next_power_of_2(dim)))

    wide = 2 if shape.dtype == "float32" else 1
    up = GemmConfig(clamp(config.up.block_n, shape.inter), clamp(config.up.block_k // wide, shape.hidden),
                    config.up.num_warps, config.up.num_stages)
    down = GemmConfig(clamp(config.down.block_n, shape.hidden), clamp(config.down.block_k // wide, shape.inter),
                      config.down.num_warps, config.down.num_stages)
    return MoEConfig(config.block_m, up, down)


# ----------------------------------------------------------------------------- host side
@dataclass
class PairLayout:
    """Pairs grouped by expert in blocks of ``block_m`` (device tensors; sizes are static upper bounds)."""

    sorted_pairs: torch.Tensor  # [max_blocks * block_m] int32 pair id, num_pairs = padding
    block_expert: torch.Tensor  # [max_blocks] int32 expert of each block, -1 past the last
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def pair_layout(top_ids: torch.Tensor, num_experts: int, block_m: int) -> PairLayout:
    """Group the ``[N, K]`` expert ids' pairs by expert; nothing is read back to the host."""
    flat = top_ids.reshape(-1)
    num_pairs = flat.shape[0]
    # sum over experts of ceil(count / block_m) <= num_pairs / block_m + num_experts
    max_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    rank = torch.empty(num_pairs, dtype=torch.int32, device=device)
    padded_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_pairs, _LAYOUT_BLOCK),)
    _rank_kernel[grid](flat, counts, rank, num_pairs, BLOCK=_LAYOUT_BLOCK)
    _offsets_kernel[(1,)](counts, padded_start, block_expert, sorted_pairs, num_experts, num_pairs, max_blocks,
                          BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=block_m, BLOCK_B=64)
    _scatter_kernel[grid](flat, rank, padded_start, sorted_pairs, num_pairs, BLOCK=_LAYOUT_BLOCK)
    return PairLayout(sorted_pairs, block_expert, num_pairs, block_m)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32; 16-bit inputs ignore it


def gate_up_act(x: torch.Tensor, gate_up: torch.Tensor, layout: PairLayout, top_k: int, cfg: GemmConfig) -> torch.Tensor:
    """``silu(x[t] @ W_gate[e]^T) * (x[t] @ W_up[e]^T)`` for every pair, ``[pairs, I]`` in x's dtype."""
    num_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    act = torch.empty(layout.num_pairs, inter, dtype=x.dtype, device=x.device)
    grid = (layout.max_blocks, triton.cdiv(inter, cfg.block_n))
    _gate_up_kernel[grid](
        x, gate_up, act, layout.sorted_pairs, layout.block_expert, layout.num_pairs, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), act.stride(0),
        TOP_K=top_k, BLOCK_M=layout.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=hidden % cfg.block_k == 0, PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return act


def down_weighted(act: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, layout: PairLayout,
                  cfg: GemmConfig) -> torch.Tensor:
    """``weights[p] * (act[p] @ W_down[e]^T)`` for every pair ``p``, ``[pairs, H]`` in act's dtype."""
    num_experts, hidden, inter = down.shape
    out = torch.empty(layout.num_pairs, hidden, dtype=act.dtype, device=act.device)
    grid = (layout.max_blocks, triton.cdiv(hidden, cfg.block_n))
    _down_kernel[grid](
        act, down, weights, out, layout.sorted_pairs, layout.block_expert, layout.num_pairs, hidden, inter,
        act.stride(0), down.stride(0), down.stride(1), down.stride(2), out.stride(0),
        BLOCK_M=layout.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=inter % cfg.block_k == 0, PRECISION=_precision(act.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def fused_experts(x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """SwiGLU experts with the same contract as ``layers.experts_forward``.

    ``x`` ``[N, H]``, ``top_ids``/``top_w`` ``[N, K]``, ``gate_up`` ``[E, 2I, H]`` (gate rows first),
    ``down`` ``[E, H, I]``; any strides (weights updated in place keep working). Returns ``[N, H]``.
    """
    if triton is None:
        raise RuntimeError("fused_experts needs triton")
    n, k = top_ids.shape
    num_experts, two_inter, hidden = gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or top_w.shape != top_ids.shape or x.shape[0] != n:
        raise ValueError(f"want x [N, H], top_ids/top_w [N, K]; got x {tuple(x.shape)}, ids {tuple(top_ids.shape)}, "
                         f"weights {tuple(top_w.shape)} with gate_up {tuple(gate_up.shape)}")
    if two_inter % 2 or down.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"want gate_up [E, 2I, H] and down [E, H, I]; got {tuple(gate_up.shape)}, {tuple(down.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if n == 0:
        return x.new_zeros(0, hidden)
    shape = MoEShape(num_experts, hidden, two_inter // 2, k, str(x.dtype).removeprefix("torch."))
    if config is None:
        config = config_for(n, shape, device_tag(x.device))
    config = fit(config, shape)
    layout = pair_layout(top_ids, num_experts, config.block_m)
    act = gate_up_act(x, gate_up, layout, k, config.up)
    pairs = down_weighted(act, down, top_w.reshape(-1), layout, config.down)
    return pairs.view(n, k, hidden).sum(dim=1)  # fixed order over k; accumulates in fp32


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit(do_not_specialize=["num_pairs"])
    def _rank_kernel(ids_ptr, counts_ptr, rank_ptr, num_pairs, BLOCK: tl.constexpr):
        """Each pair's rank within its expert (the order among equals is whatever the atomics give)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < num_pairs
        expert = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        rank = tl.atomic_add(counts_ptr + expert, 1, mask=ok)
        tl.store(rank_ptr + offs, rank, mask=ok)

    @triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
    def _offsets_kernel(counts_ptr, padded_start_ptr, block_expert_ptr, sorted_ptr, num_experts, num_pairs,
                        max_blocks, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        """One program: padded run starts, the padding rows' sentinel, and each block's expert."""
        e = tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        count = tl.load(counts_ptr + e, mask=e_ok, other=0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        tl.store(padded_start_ptr + e, starts, mask=e_ok)
        j = tl.arange(0, BLOCK_M)
        fill = count[:, None] + j[None, :]
        tl.store(sorted_ptr + starts[:, None] + fill, num_pairs + tl.zeros_like(fill),
                 mask=e_ok[:, None] & (fill < padded[:, None]))
        total = tl.sum(padded, axis=0)
        for b0 in range(0, max_blocks, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            first = b * BLOCK_M
            # the block's expert: how many experts' padded runs end at or before its first row
            expert = tl.sum(((ends[None, :] <= first[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
            expert = tl.where(first < total, expert, -1)
            tl.store(block_expert_ptr + b, expert, mask=b < max_blocks)

    @triton.jit(do_not_specialize=["num_pairs"])
    def _scatter_kernel(ids_ptr, rank_ptr, padded_start_ptr, sorted_ptr, num_pairs, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < num_pairs
        expert = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        rank = tl.load(rank_ptr + offs, mask=ok, other=0)
        start = tl.load(padded_start_ptr + expert, mask=ok, other=0)
        tl.store(sorted_ptr + start + rank, offs, mask=ok)

    @triton.jit(do_not_specialize=["num_pairs"])
    def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_pairs, hidden, inter,
                        stride_xt, stride_we, stride_wn, stride_wk, stride_op,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert < 0:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < num_pairs
        token = (pair // TOP_K).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [K, N] tile
        u_ptrs = g_ptrs + inter * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                wg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                wu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < hidden - k0
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_op + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["num_pairs"])
    def _down_kernel(a_ptr, w_ptr, weights_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_pairs, hidden, inter,
                     stride_ap, stride_we, stride_wn, stride_wk, stride_op,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert < 0:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < num_pairs
        pair64 = pair.to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + pair64[:, None] * stride_ap + offs_k[None, :]
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
                  + offs_k[:, None] * stride_wk)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < inter - k0
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        route_w = tl.load(weights_ptr + pair64, mask=valid, other=0.0).to(tl.float32)
        acc = acc * route_w[:, None]
        out_ptrs = out_ptr + pair64[:, None] * stride_op + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
