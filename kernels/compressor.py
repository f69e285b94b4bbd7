"""Compressor pooling: a per-channel softmax over the slots of each window (V4_MODEL.md §2.3).

HCA pools the m tokens of a window; CSA pools 2m slots (previous window's first half-channels, current
window's second half-channels). Empty slots carry gate -inf and kv 0.
"""

from __future__ import annotations

import torch


def compress_pool_ref(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """kv, gate [W, slots, d] (gate already includes the position bias) -> [W, d] in kv's dtype.

    The softmax runs in fp32 and is cast to kv's dtype before the weighted sum (transformers' order)."""
    return (kv * gate.float().softmax(dim=1).to(kv.dtype)).sum(dim=1)


def compress_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Dispatch point for compressor pooling (torch reference today)."""
    if kv.shape != gate.shape or kv.dim() != 3:
        raise ValueError(f"compress_pool: kv {tuple(kv.shape)} and gate {tuple(gate.shape)} must both be "
                         f"[windows, slots, d]")
    return compress_pool_ref(kv, gate)
