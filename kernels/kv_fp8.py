"""The KV cache's "fp8" entry layout as the kernels read it (byte for byte model/kv_format.py's pack_main/pack_index;
tests/test_kernels.py proves the unpacking here equals model/kv_format.py's). Kernels cannot import the model
layer, so the layout is restated here; the torch unpacking below is the oracle of the FP8 kernel paths.

Main entry, [entry_bytes] uint8, nope = head_dim - rope_dim:
  bytes [0, nope)                      the nope dims in e4m3,
  bytes [nope, nope + 2 rope)          the rope dims in bf16 (little endian),
  bytes [nope + 2 rope, + nope / 64)   one ue8m0 scale per 64 nope dims (value 2^(byte - 127)),
  then zero padding to a multiple of 8 bytes (584 B at head_dim 512, rope 64).
Indexer key, [dI + 4] uint8: the dims in e4m3, then one fp32 scale (little endian) — 132 B at dI = 128.
"""

from __future__ import annotations

import math

import torch

NOPE_SCALE_BLOCK = 64     # nope dims per ue8m0 scale byte
ENTRY_ALIGN = 8           # main entries are padded to a multiple of 8 bytes


def main_entry_bytes(head_dim: int, rope_dim: int) -> int:
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + math.ceil(nope / NOPE_SCALE_BLOCK)
    return -(-raw // ENTRY_ALIGN) * ENTRY_ALIGN


def index_entry_bytes(index_dim: int) -> int:
    return index_dim + 4


def unpack_main_ref(b: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., entry_bytes] uint8 -> [..., head_dim] in `dtype` (nope = e4m3 * 2^(scale - 127), rope = bf16)."""
    nope = head_dim - rope_dim
    n_scales = math.ceil(nope / NOPE_SCALE_BLOCK)
    if b.dtype != torch.uint8 or b.shape[-1] != main_entry_bytes(head_dim, rope_dim):
        raise ValueError(f"unpack_main_ref: entries must be uint8 [..., {main_entry_bytes(head_dim, rope_dim)}] for "
                         f"head_dim {head_dim}, rope_dim {rope_dim}; got {b.dtype} {list(b.shape)}")
    lead = b.shape[:-1]
    b = b.reshape(-1, b.shape[-1])
    q = b[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
    scales = torch.exp2(b[:, nope + 2 * rope_dim:nope + 2 * rope_dim + n_scales].float() - 127)
    nope_vals = q * scales.repeat_interleave(NOPE_SCALE_BLOCK, dim=1)[:, :nope]
    rope = b[:, nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope_vals, rope], dim=1).to(dtype).reshape(*lead, head_dim)


def unpack_index_ref(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., dI + 4] uint8 -> [..., dI] in `dtype` (e4m3 times the entry's fp32 scale, in fp32)."""
    if b.dtype != torch.uint8 or b.shape[-1] < 5:
        raise ValueError(f"unpack_index_ref: keys must be uint8 [..., dI + 4]; got {b.dtype} {list(b.shape)}")
    lead, dI = b.shape[:-1], b.shape[-1] - 4
    b = b.reshape(-1, b.shape[-1])
    scale = b[:, dI:].contiguous().view(torch.float32)
    return (b[:, :dI].contiguous().view(torch.float8_e4m3fn).float() * scale).to(dtype).reshape(*lead, dI)
