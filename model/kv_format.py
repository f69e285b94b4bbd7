"""Byte formats of cached V4 entries and the KV arithmetic built on them (docs/v4_model.md §3.1-3.2).

Entry formats:
* "fp32" / "bf16": a plain vector (4 or 2 bytes per value).
* "fp8" (the engines' layout): a main entry is the nope dims in e4m3 with one ue8m0 scale per 64 dims, the
  rope dims in bf16, padded to 8 bytes — 448 + 128 + 7 + 1 = 584 B at V4's 512 dims; an indexer key is its
  dims in e4m3 plus one fp32 scale — 128 + 4 = 132 B.
Compressor rings always hold fp32 rows (raw kv and gate + position bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import CSA, SWA, V4Config

ENTRY_FORMATS = ("fp32", "bf16", "fp8")
NOPE_SCALE_BLOCK = 64
E4M3_MAX = 448.0
# DeepSeek-V3.2 for comparison (docs/v4_model.md §3.1): MLA latent 512 + rope 64 per token per layer, 61 layers,
# plus a 128-dim indexer key. FP8 (FlashMLA): 656 B + 132 B; BF16: 1152 B + 256 B.
V32_LAYERS = 61
V32_BYTES = {"fp8": 656 + 132, "bf16": 1152 + 256, "fp32": 2 * (1152 + 256)}


def main_entry_bytes(head_dim: int, rope_dim: int, fmt: str) -> int:
    if fmt == "fp8":
        nope = head_dim - rope_dim
        raw = nope + 2 * rope_dim + math.ceil(nope / NOPE_SCALE_BLOCK)
        return -(-raw // 8) * 8
    return head_dim * (4 if fmt == "fp32" else 2)


def index_key_bytes(index_dim: int, fmt: str) -> int:
    if fmt == "fp8":
        return index_dim + 4
    return index_dim * (4 if fmt == "fp32" else 2)


def _check(fmt: str) -> None:
    if fmt not in ENTRY_FORMATS:
        raise ValueError(f"kv format must be one of {ENTRY_FORMATS}, got {fmt!r}")


# ---- packing ---------------------------------------------------------------------------------------------

def pack_main(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[E, d] float -> [E, main_entry_bytes] uint8 (fp8 layout)."""
    E, d = x.shape
    nope = d - rope_dim
    n_scales = math.ceil(nope / NOPE_SCALE_BLOCK)
    out = torch.zeros(E, main_entry_bytes(d, rope_dim, "fp8"), dtype=torch.uint8, device=x.device)
    xn = torch.zeros(E, n_scales * NOPE_SCALE_BLOCK, device=x.device)
    xn[:, :nope] = x[:, :nope].float()
    blocks = xn.view(E, n_scales, NOPE_SCALE_BLOCK)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / E4M3_MAX)).clamp(-127, 127)
    q = (blocks / torch.exp2(exp)[..., None]).to(torch.float8_e4m3fn).view(E, -1)[:, :nope]
    out[:, :nope] = q.view(torch.uint8)
    out[:, nope:nope + 2 * rope_dim] = x[:, nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    out[:, nope + 2 * rope_dim:nope + 2 * rope_dim + n_scales] = (exp + 127).to(torch.uint8)
    return out


def unpack_main(b: torch.Tensor, head_dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., main_entry_bytes] uint8 -> [..., head_dim] in `dtype` (any leading shape: a decode step gathers
    [sequences, keys, bytes])."""
    if b.dim() != 2:
        return unpack_main(b.reshape(-1, b.shape[-1]), head_dim, rope_dim, dtype).view(*b.shape[:-1], head_dim)
    E = b.shape[0]
    nope = head_dim - rope_dim
    n_scales = math.ceil(nope / NOPE_SCALE_BLOCK)
    q = b[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
    scales = torch.exp2(b[:, nope + 2 * rope_dim:nope + 2 * rope_dim + n_scales].float() - 127)
    nope_vals = q * scales.repeat_interleave(NOPE_SCALE_BLOCK, dim=1)[:, :nope]
    rope = b[:, nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope_vals, rope], dim=1).to(dtype).view(E, head_dim)


def pack_index(x: torch.Tensor) -> torch.Tensor:
    """[E, dI] float -> [E, dI + 4] uint8: e4m3 values and one fp32 scale."""
    E, dI = x.shape
    scale = (x.float().abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-30)
    out = torch.empty(E, dI + 4, dtype=torch.uint8, device=x.device)
    out[:, :dI] = (x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    out[:, dI:] = scale.contiguous().view(torch.uint8)
    return out


def unpack_index(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., dI + 4] uint8 -> [..., dI] in `dtype`."""
    if b.dim() != 2:
        return unpack_index(b.reshape(-1, b.shape[-1]), dtype).view(*b.shape[:-1], b.shape[-1] - 4)
    dI = b.shape[1] - 4
    scale = b[:, dI:].contiguous().view(torch.float32)
    return (b[:, :dI].contiguous().view(torch.float8_e4m3fn).float() * scale).to(dtype)


# ---- arithmetic ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVBytes:
    """Cache bytes of one model in one entry format."""

    per_token: float            # amortised compressed bytes per context token, all layers
    per_block: int              # bytes of one token block (block_size tokens) across all layers' pools
    swa_per_seq: int            # sliding-window rings, all layers
    compressor_state_per_seq: int  # fp32 compressor rings, all layers
    block_size: int

    @property
    def fixed_per_seq(self) -> int:
        return self.swa_per_seq + self.compressor_state_per_seq

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def sequence_bytes(self, tokens: int) -> int:
        """Bytes one sequence of `tokens` occupies in paged pools (blocks rounded up) plus its fixed state."""
        return self.blocks_for(tokens) * self.per_block + self.fixed_per_seq


PREFIX_UNIT = 128  # tokens per cached prefix unit (and the granularity of block sizes): lcm of V4's rates (4, 128)
MIN_BLOCK_TOKENS = 256


def default_block_size(cfg: V4Config) -> int:
    """Tokens per KV block when none is given: the smallest multiple of lcm(128, every compression rate) that is
    >= 256, so that a block holds whole compressed entries of every layer and whole prefix units (256 for the
    real V4 rates 4 and 128; 384 for rates 4 and 24)."""
    unit = math.lcm(PREFIX_UNIT, *(r for r in cfg.compress_ratios if r))
    return unit * -(-MIN_BLOCK_TOKENS // unit)


def kv_bytes(cfg: V4Config, fmt: str, block_size: int | None = None) -> KVBytes:
    _check(fmt)
    block_size = block_size or default_block_size(cfg)
    main = main_entry_bytes(cfg.head_dim, cfg.qk_rope_head_dim, fmt)
    idx = index_key_bytes(cfg.index_head_dim, fmt)
    per_token = 0.0
    per_block = swa = state = 0
    for kind, m in zip(cfg.layer_types, cfg.compress_ratios):
        swa += cfg.sliding_window * main
        if kind == SWA:
            continue
        coff = 2 if kind == CSA else 1
        rows = 2 * m if kind == CSA else m
        state += rows * 2 * coff * cfg.head_dim * 4
        per_token += main / m
        per_block += (block_size // m) * main
        if kind == CSA:
            state += 2 * m * 2 * 2 * cfg.index_head_dim * 4
            per_token += idx / m
            per_block += (block_size // m) * idx
    return KVBytes(per_token, per_block, swa, state, block_size)


def v32_bytes_per_token(fmt: str) -> int:
    return V32_LAYERS * V32_BYTES[fmt]


@dataclass(frozen=True)
class Capacity:
    num_blocks: int
    max_tokens: int          # context tokens that fit in total (one sequence)
    max_seqs: int            # sequences of `seq_len` tokens that fit at once


def capacity(cfg: V4Config, budget_bytes: int, fmt: str, seq_len: int, block_size: int | None = None) -> Capacity:
    """How many tokens and how many `seq_len`-token sequences fit in `budget_bytes` (fixed state counted)."""
    kb = kv_bytes(cfg, fmt, block_size)
    max_tokens = max(0, (budget_bytes - kb.fixed_per_seq) // kb.per_block * kb.block_size) if kb.per_block else \
        (cfg.max_position_embeddings if budget_bytes >= kb.fixed_per_seq else 0)
    max_seqs = budget_bytes // kb.sequence_bytes(seq_len)
    num_blocks = budget_bytes // kb.per_block if kb.per_block else 0
    return Capacity(num_blocks, int(max_tokens), int(max_seqs))
