"""Compressor pooling: a per-channel softmax over the slots of each window (docs/v4_model.md §2.3).

HCA pools the m tokens of a window; CSA pools 2m slots (previous window's first half-channels, current
window's second half-channels). Empty slots carry gate -inf and kv 0.

Triton path: one program per (window, channel block) holds all slots of its channels, so the softmax over slots
and the weighted sum are one pass over kv and gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import kernel_backend, launch, record_triton_call


def compress_pool_ref(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """kv, gate [W, slots, d] (gate already includes the position bias) -> [W, d] in kv's dtype.

    The softmax runs in fp32 and is cast to kv's dtype before the weighted sum (transformers' order)."""
    return (kv * gate.float().softmax(dim=1).to(kv.dtype)).sum(dim=1)


@triton.jit
def _compress_pool_kernel(kv_ptr, gate_ptr, out_ptr, S, D, stride_kw, stride_ks, stride_gw, stride_gs, stride_ow,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    w = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s_mask, d_mask = s < S, d < D
    mask = s_mask[:, None] & d_mask[None, :]
    gate = tl.load(gate_ptr + w * stride_gw + s[:, None] * stride_gs + d[None, :], mask=mask,
                   other=0.0).to(tl.float32)                                                    # [BS, BD]
    gate = tl.where(s_mask[:, None], gate, float("-inf"))                  # padding slots get no weight
    p = tl.exp(gate - tl.max(gate, axis=0)[None, :])
    p = p / tl.sum(p, axis=0)[None, :]
    p = p.to(out_ptr.dtype.element_ty).to(tl.float32)                      # the reference casts to kv's dtype
    kv = tl.load(kv_ptr + w * stride_kw + s[:, None] * stride_ks + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + w * stride_ow + d, tl.sum(kv * p, axis=0).to(out_ptr.dtype.element_ty), mask=d_mask)


def compress_pool_triton(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Triton form of `compress_pool_ref`: kv, gate [W, slots, d] -> [W, d] in kv's dtype."""
    W, S, D = kv.shape
    for x, what in ((kv, "kv"), (gate, "gate")):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compress_pool_triton: {what} must be fp32/bf16/fp16, got {x.dtype}")
        if x.stride(2) != 1:
            raise ValueError(f"compress_pool_triton: {what}'s channel dim must be contiguous, strides {x.stride()}")
    if kv.device != gate.device:
        raise ValueError(f"compress_pool_triton: kv on {kv.device}, gate on {gate.device}")
    out = torch.empty(W, D, dtype=kv.dtype, device=kv.device)
    if W == 0 or D == 0:
        return out
    if S == 0:
        raise ValueError("compress_pool_triton: a window needs at least one slot")
    block_s = triton.next_power_of_2(S)
    block_d = min(triton.next_power_of_2(D), max(16, 4096 // block_s))   # a [slots, channels] tile of <= 4K
    launch(_compress_pool_kernel, (W, triton.cdiv(D, block_d)),
        kv, gate, out, S, D, kv.stride(0), kv.stride(1), gate.stride(0), gate.stride(1), out.stride(0),
        BLOCK_S=block_s, BLOCK_D=block_d)
    record_triton_call("compress_pool")
    return out


def compress_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Dispatch point for compressor pooling: Triton or the torch reference (see `backend`)."""
    if kv.shape != gate.shape or kv.dim() != 3:
        raise ValueError(f"compress_pool: kv {tuple(kv.shape)} and gate {tuple(gate.shape)} must both be "
                         f"[windows, slots, d]")
    if kernel_backend(kv.device) == "triton":
        return compress_pool_triton(kv, gate)
    return compress_pool_ref(kv, gate)
