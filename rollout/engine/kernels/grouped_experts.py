"""SwiGLU experts as two grouped GEMMs, with no host synchronisation.

The usual recipe counts tokens per expert with ``torch.bincount``; on CUDA that
reads the largest id back to the host (``.item()``) on every MoE layer, which
stalls an overlapped loop and cannot be recorded in a CUDA graph. Here the group
offsets come from ``searchsorted`` over the sorted expert ids instead, so every
shape depends only on ``N * top_k`` and the number of experts, and the whole
call is graph-capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_available(x: torch.Tensor) -> bool:
    """``torch._grouped_mm`` runs bf16 on CUDA (SM80+ in torch >= 2.9), and any float dtype on CPU (torch >= 2.11)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End offset of each expert's rows in ``sorted_ids`` (int32, ``[E]``): the ``offs`` of ``_grouped_mm``."""
    experts = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)


def grouped_experts_forward(x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor,
                            gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``sum_k top_w[n, k] * down[e] @ (silu(g) * u)`` with ``[g, u] = gate_up[e] @ x[n]``, ``e = top_ids[n, k]``.

    Args:
        x: ``[N, H]`` tokens; top_ids / top_w: ``[N, K]`` routes and their weights.
        gate_up: ``[E, 2I, H]`` (gate rows then up rows); down: ``[E, H, I]``.

    Each token's K contributions are summed in a fixed order (no atomics), so
    the same batch gives the same bits on every call.
    """
    n, k = top_ids.shape
    num_experts = gate_up.shape[0]
    flat = top_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    offsets = expert_offsets(sorted_ids, num_experts)
    rows = x[order // k]
    gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out_sorted = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    per_choice = torch.empty_like(out_sorted)
    per_choice[order] = out_sorted
    weighted = per_choice.view(n, k, -1) * top_w.unsqueeze(-1)
    return weighted.sum(dim=1).to(x.dtype)


def experts_forward_ref(x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One token and one expert at a time: slow, obviously right."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(top_ids.shape[1]):
            e = int(top_ids[t, j])
            gate, up = F.linear(x[t].float(), gate_up[e].float()).chunk(2)
            out[t] += top_w[t, j].float() * F.linear(F.silu(gate) * up, down[e].float())
    return out.to(x.dtype)
