"""Decode attention that reads K/V straight from the engine's slot pool.

One query token per sequence attends over the slots listed in its row of a
padded slot table. The KV pool is never gathered into a padded ``[B, S, H, D]``
copy: on a GPU that copy costs as much memory traffic as the attention itself,
every layer, every step. All shapes are static for a given batch and table
width, and nothing here reads a value back to the host, so the call can be
recorded in a CUDA graph.

Grid: one program per (sequence, KV head). It loads the query heads that share
that KV head (GQA) as one tile, so each K/V row is read once per group rather
than once per query head, and runs an online softmax over blocks of slots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from rollout.engine.kernels.tuned import device_tag, find_config

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference still works
    triton = None

MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # slots per loop iteration
    num_warps: int = 4
    num_stages: int = 3


def config_file_name(head_dim: int, group: int, dtype: torch.dtype, device: str) -> str:
    return f"paged_decode_attention_D{head_dim}_G{group}_{str(dtype).removeprefix('torch.')}_{device}.json"


@lru_cache(maxsize=None)
def tuned_config(head_dim: int, group: int, dtype: torch.dtype, device: str) -> DecodeConfig:
    """The tuned config for this shape and device (``tuned.find_config``), else the default."""
    path = find_config(config_file_name(head_dim, group, dtype, device))
    if path is None:
        return DecodeConfig()
    try:
        cfg = DecodeConfig(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a decode-attention config ({exc})") from None
    if cfg.block_n < MIN_DOT or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"{path}: block_n must be a power of two >= {MIN_DOT}, got {cfg.block_n}")
    return cfg


def paged_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               slot_table: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float | None = None, table_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: gather the slots, mask the padding, softmax in fp32. The correctness bar for the kernel."""
    _check_shapes(q, k_pool, v_pool, slot_table, seq_lens, table_rows)
    if table_rows is not None:
        slot_table = slot_table[table_rows.long()]
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_pool.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    keys = k_pool[slot_table.long()].float().repeat_interleave(group, dim=2)  # [B, S, Hq, D]
    values = v_pool[slot_table.long()].float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), keys) * scale
    positions = torch.arange(slot_table.shape[1], device=q.device)
    scores = scores.masked_fill(positions[None, None, :] >= seq_lens.long()[:, None, None], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), values).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           slot_table: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None, table_rows: torch.Tensor | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """``out[b, h] = softmax(q[b, h] . K[slots_b]^T * scale) @ V[slots_b]`` with the Triton kernel.

    Args:
        q: ``[B, Hq, D]``, the new token of each sequence (after RoPE).
        k_pool, v_pool: one layer of the pool, ``[slots, Hkv, D]``; ``Hq`` must be a multiple of ``Hkv``.
        slot_table: ``[R, max_len]`` int32/int64; a row lists one sequence's slots in position order, the new
            token's slot included. Entries past the sequence's length are never read.
        seq_lens: ``[B]``, tokens to attend over, each in ``[1, max_len]`` (values above are clamped).
        table_rows: ``[B]``, the row of ``slot_table`` of each sequence; ``None`` means row ``b``. Passing
            the engine's whole request->slot table with its rows avoids gathering ``[B, max_context]`` per step.
        config: block size and launch shape; ``None``: the tuned one for this device (``tuned_config``).
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton; use paged_decode_attention_ref without it")
    _check_shapes(q, k_pool, v_pool, slot_table, seq_lens, table_rows)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous last (head_dim) dimension")
    out = torch.empty_like(q)
    scale = head_dim ** -0.5 if scale is None else scale
    if config is None:
        config = tuned_config(head_dim, group, q.dtype, device_tag(q.device))
    _decode_kernel[(batch, num_kv_heads)](
        q, k_pool, v_pool, slot_table, seq_lens, seq_lens if table_rows is None else table_rows, out,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        slot_table.stride(0), out.stride(0), out.stride(1),
        slot_table.shape[1], scale * math.log2(math.e),
        GROUP=group, HEAD_DIM=head_dim, HAS_ROWS=table_rows is not None,
        BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)),
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        BLOCK_N=config.block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32; tf32 would cost 1e-3
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _check_shapes(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  slot_table: torch.Tensor, seq_lens: torch.Tensor, table_rows: torch.Tensor | None) -> None:
    """Shape and dtype checks only: reading values would synchronise the host with the device."""
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.shape != k_pool.shape:
        raise ValueError(f"want q [B, Hq, D] and k/v pools [slots, Hkv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}")
    if q.shape[2] != k_pool.shape[2] or q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"head_dim must match and Hq must be a multiple of Hkv; got q {tuple(q.shape)}, "
                         f"k pool {tuple(k_pool.shape)}")
    batch = q.shape[0]
    rows = batch if table_rows is None else slot_table.shape[0]
    if slot_table.dim() != 2 or slot_table.shape[0] != rows or seq_lens.shape != (batch,):
        raise ValueError(f"want slot_table [B, max_len] (or [R, max_len] with table_rows) and seq_lens [B], "
                         f"B={batch}; got {tuple(slot_table.shape)} and {tuple(seq_lens.shape)}")
    if table_rows is not None and table_rows.shape != (batch,):
        raise ValueError(f"table_rows must be [B] with B={batch}, got {tuple(table_rows.shape)}")
    for name, t in (("slot_table", slot_table), ("seq_lens", seq_lens), ("table_rows", table_rows)):
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, rows_ptr, out_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_tb, stride_ob, stride_oh,
        max_len, scale_log2,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ROWS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q_heads = kv_head * GROUP + g
        q = tl.load(q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_ROWS:
            row = tl.load(rows_ptr + seq).to(tl.int64)
        else:
            row = seq.to(tl.int64)
        seq_len = tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), max_len)

        running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < seq_len
            slots = tl.load(table_ptr + row * stride_tb + n, mask=n_ok, other=0).to(tl.int64)
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale_log2  # [G, N], log2 domain
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            rescale = tl.exp2(running_max - new_max)
            probs = tl.exp2(scores - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=kv_ok, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            running_max = new_max
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
