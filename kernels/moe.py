"""Routed-expert MLP over tokens grouped by expert (the compute step of expert parallelism).

Expert_e(x) = W2_e (SiLU(min(W1_e x, limit)) * clamp(W3_e x, -limit, limit)), scaled by the routing weight
after W2 (transformers' order; V4_MODEL.md §2.5, §6.10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import QuantTensor


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def expert_mlp_ref(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor,
                   experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]], limit: float) -> torch.Tensor:
    """x [M, D] (one row per (token, expert) pair), expert_idx [M] global ids held in `experts`,
    weights [M] routing weights -> [M, D] weighted expert outputs in x's dtype."""
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    order = torch.argsort(expert_idx, stable=True)
    ids, counts = torch.unique_consecutive(expert_idx[order], return_counts=True)
    outs = []
    for e, xe in zip(ids.tolist(), x[order].split(counts.tolist())):  # contiguous rows per expert
        w1, w2, w3 = (w.dequantize(x.dtype) for w in experts[e])
        outs.append(F.linear(swiglu_clamped(F.linear(xe, w1), F.linear(xe, w3), limit), w2))
    out[order] = torch.cat(outs) * weights[order, None].to(x.dtype)
    return out


def expert_mlp(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor,
               experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]], limit: float) -> torch.Tensor:
    """Dispatch point for the grouped expert GEMM (torch reference today)."""
    if x.dim() != 2 or expert_idx.shape != x.shape[:1] or weights.shape != x.shape[:1]:
        raise ValueError(f"expert_mlp: x must be [M, D] with expert_idx/weights [M]; got {tuple(x.shape)}, "
                         f"{tuple(expert_idx.shape)}, {tuple(weights.shape)}")
    return expert_mlp_ref(x, expert_idx, weights, experts, limit)
