"""Shared-KV multi-query attention with a per-head sink (docs/v4_model.md §2.2).

p_{h,s} = exp(l_{h,s}) / (sum_s' exp(l_{h,s'}) + exp(sink_h)); o_h = sum_s p_{h,s} v_s with v = k (K = V).

Triton path: one program per (query row, block of heads) streams that row's keys once for all heads of the block
(K = V is one shared head, so a key tile serves every head) with an online softmax whose running max and sum
start at the sink (m = sink_h, l = 1), so the sink needs no extra column and a row whose keys are all masked
returns zeros like the reference. Key blocks whose bias is all -inf are skipped. Prefill (`sink_attention`)
runs the same kernel with the shared keys broadcast to every query row (stride 0).

FP8 cache (`sparse_sink_attention_fp8`): the same kernel reads the gathered cache entries as packed bytes
(kernels/kv_fp8.py: e4m3 nope dims with a ue8m0 scale per 64, bf16 rope dims) and dequantizes each key tile in
registers; its reference unpacks the entries to q's dtype and runs `sparse_sink_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention_cpu
from .backend import kernel_backend, launch, record_triton_call, triton_interpreted
from .kv_fp8 import main_entry_bytes, unpack_main_ref


def sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [T, H, d], kv [S, d] (one shared K=V head), bias [T, S] (0 or -inf), sinks [H] -> [T, H, d].
    Stacked (`StepBatch.prefill_stacks`, torch only): q [G, T, H, d] and kv [G, S, d], G groups of their own keys
    under one bias [T, S] (or each its own, [G, T, S]) -> [G, T, H, d].

    Logits, softmax and the probability-weighted sum run in fp32; the result is cast to q's dtype.
    """
    kv = kv.float()   # once: both products read the same fp32 keys (a compiled step then materializes one copy)
    logits = torch.einsum("...thd,...sd->...hts", q.float(), kv) * scale + bias.float().unsqueeze(-3)
    probs = sink_softmax(logits, sinks.float()[:, None, None])
    return torch.einsum("...hts,...sd->...thd", probs, kv).to(q.dtype)


def sink_softmax(logits: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """The softmax of [logits, sink] over the last dimension, without the sink's column: logits [..., S], sink
    broadcasting to [..., 1]. No concatenated copy of the logits (in a compiled step, one pass over them fewer;
    the same sums up to their order). A row of -inf logits gives zeros."""
    m = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
    p = torch.exp(logits - m)
    return p / (p.sum(dim=-1, keepdim=True) + torch.exp(sink - m))


def sparse_sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Each query row with its own gathered keys: q [n, H, d], kv [n, K, d], bias [n, K] (0 / -inf, e.g. padding)
    -> [n, H, d]. The decode form: window ring + selected compressed entries per sequence."""
    kv = kv.float()   # once, as above
    logits = torch.einsum("nhd,nkd->nhk", q.float(), kv) * scale + bias.float()[:, None, :]
    probs = sink_softmax(logits, sinks.float()[:, None])
    return torch.einsum("nhk,nkd->nhd", probs, kv).to(q.dtype)


def banded_sink_attention(q: torch.Tensor, window_keys: torch.Tensor, ring_pad: torch.Tensor, entries: torch.Tensor,
                          entry_bias: torch.Tensor, sinks: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """One prompt chunk's attention with its sliding window as a band (the torch backend's prefill form).

    q [n, H, d]: the chunk's queries at consecutive positions; window_keys [w-1+n, d]: the w-1 positions before the
    chunk, then its own n rows (the first `ring_pad` [1] of them lie before the sequence's start: padding); entries
    [E, d] with entry_bias [n, E] (0 where a query sees an entry, -inf elsewhere) -> [n, H, d].

    Query i sees window keys i .. i+w-1. The queries go in blocks of w, each block over its own slice of 2w-1 keys
    (an `unfold` view), so the window costs n (2w-1) scores where `sink_attention_ref` with a dense bias costs
    n (n+w-1): at 4096 tokens and w = 16 the whole call is ~7x faster, and its logits no longer grow with n^2.
    The same softmax over the same keys as `sink_attention_ref`, up to fp32 summation order."""
    n, H, d = q.shape
    w, E = window, entries.shape[0]
    blocks = (n + w - 1) // w
    pad = blocks * w - n                                                    # queries padded to whole blocks
    keys = torch.cat([window_keys.float(), window_keys.new_zeros(pad, d, dtype=torch.float32)])
    kb = keys.unfold(0, 2 * w - 1, w).transpose(1, 2)                       # [blocks, 2w-1, d]
    qb = torch.cat([q.float(), q.new_zeros(pad, H, d, dtype=torch.float32)]).view(blocks, w, H, d)
    rel = torch.arange(2 * w - 1, device=q.device)[None, :] - torch.arange(w, device=q.device)[:, None]
    key = (torch.arange(blocks, device=q.device)[:, None, None] * w
           + torch.arange(2 * w - 1, device=q.device)[None, None, :])      # [blocks, 1, 2w-1]: index in window_keys
    seen = (rel >= 0) & (rel < w) & (key >= ring_pad)                       # [blocks, w, 2w-1]
    window_logits = (torch.einsum("bqhd,bkd->bhqk", qb, kb) * scale
                     + torch.zeros_like(seen, dtype=torch.float32).masked_fill(~seen, float("-inf"))[:, None])
    eb = torch.cat([entry_bias.float(), entry_bias.new_full((pad, E), float("-inf"), dtype=torch.float32)])
    entry_logits = torch.einsum("bqhd,ed->bhqe", qb, entries.float()) * scale + eb.view(blocks, w, E)[:, None]
    sink = sinks.float()[None, :, None, None].expand(blocks, H, w, 1)
    combined = torch.cat([window_logits, entry_logits, sink], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)
    K = 2 * w - 1
    out = (torch.einsum("bhqk,bkd->bqhd", probs[..., :K], kb)
           + torch.einsum("bhqe,ed->bqhd", probs[..., K:-1], entries.float()))
    return out.reshape(blocks * w, H, d)[:n].to(q.dtype)


@triton.jit
def _load_keys(kv_ptr, row_off, k, d, k_mask, d_mask, stride_kk,
               KV_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr):
    """[BLOCK_K, BLOCK_D] keys as fp32. KV_FP8: kv_ptr points at packed uint8 entries (kv_fp8's layout; row_off and
    stride_kk in bytes): e4m3 nope dims times their ue8m0 scale, bf16 rope dims, dequantized here in registers."""
    if KV_FP8:
        row = row_off + k[:, None] * stride_kk                                   # byte offset of each entry
        nope = (d < NOPE)[None, :] & k_mask[:, None]
        x = tl.load(kv_ptr.to(tl.pointer_type(tl.float8e4nv)) + row + d[None, :], mask=nope, other=0.0)
        sb = tl.load(kv_ptr + row + (NOPE + 2 * ROPE) + d[None, :] // 64, mask=nope, other=127).to(tl.int32)
        x = x.to(tl.float32) * (sb << 23).to(tl.float32, bitcast=True)          # 2^(b - 127); pack writes b >= 19
        rope = (d >= NOPE)[None, :] & d_mask[None, :] & k_mask[:, None]
        r = tl.load(kv_ptr.to(tl.pointer_type(tl.bfloat16)) + (row + NOPE) // 2 + (d[None, :] - NOPE), mask=rope,
                    other=0.0).to(tl.float32)
        return tl.where((d < NOPE)[None, :], x, r)
    else:
        return tl.load(kv_ptr + row_off + k[:, None] * stride_kk + d[None, :],
                       mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _sink_attention_kernel(q_ptr, kv_ptr, bias_ptr, sink_ptr, out_ptr, H, K, D, scale,
                           stride_qn, stride_qh, stride_kn, stride_kk, stride_bn, stride_on, stride_oh,
                           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                           KV_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask, d_mask = h < H, d < D
    q = tl.load(q_ptr + row * stride_qn + h[:, None] * stride_qh + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32).to(DOT_DTYPE)   # [BH, BD]
    m = tl.load(sink_ptr + h, mask=h_mask, other=0.0).to(tl.float32)      # running max, starts at the sink
    l = tl.zeros((BLOCK_H,), dtype=tl.float32) + 1.0                        # exp(sink - m)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        b = tl.load(bias_ptr + row * stride_bn + k, mask=k_mask, other=float("-inf")).to(tl.float32)   # [BK]
        if tl.max(b, axis=0) > float("-inf"):                               # skip fully masked key blocks
            kv = _load_keys(kv_ptr, row * stride_kn, k, d, k_mask, d_mask, stride_kk,
                            KV_FP8, NOPE, ROPE).to(DOT_DTYPE)                                # [BK, BD]
            logits = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * scale + b[None, :]  # [BH, BK]
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(logits - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), kv, input_precision=PRECISION)
            m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + row * stride_on + h[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & d_mask[None, :])


_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def attention_launch_settings(H: int, d: int, dtype: torch.dtype, kv_fp8: bool) -> dict:
    """Block sizes and warps of `_sink_attention_kernel` (the only place they are chosen; kernels/aot.py compiles
    what the wrappers launch with them and checks that none spills registers).

    32 heads share each key tile (tl.dot needs >= 16 rows). At head_dim 512 the [32, 512] fp32 accumulator, the q
    tile and the key tile fill 8 warps' registers: 32 keys per step in bf16; 16 when the keys are fp32 or are
    dequantized from FP8 in registers (32 spilled there)."""
    block_d = triton.next_power_of_2(d)
    wide = block_d >= 256
    block_k = (16 if dtype == torch.float32 or kv_fp8 else 32) if wide else 64
    return dict(BLOCK_H=16 if H <= 16 else 32, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8 if wide else 4)


def _launch_sink_attention(q: torch.Tensor, kv: torch.Tensor, stride_kn: int, bias: torch.Tensor,
                           sinks: torch.Tensor, scale: float, name: str,
                           fp8: tuple[int, int] | None = None) -> torch.Tensor:
    """q [n, H, d]; kv rows of row i at kv + i * stride_kn ([K, d], unit stride in d); bias [n, K].
    fp8 = (head_dim, rope_dim): kv holds packed uint8 entries [K, entry_bytes] (strides in bytes) instead."""
    n, H, d = q.shape
    if q.dtype not in _TL_FLOAT:
        raise ValueError(f"{name}: q must be fp32/bf16/fp16, got {q.dtype}")
    if fp8 is None and kv.dtype not in _TL_FLOAT:
        raise ValueError(f"{name}: kv must be fp32/bf16/fp16, got {kv.dtype}")
    if fp8 is None and q.dtype != kv.dtype:
        raise ValueError(f"{name}: q ({q.dtype}) and kv ({kv.dtype}) must share a dtype")
    if not (q.device == kv.device == bias.device == sinks.device):
        raise ValueError(f"{name}: q, kv, bias, sinks must be on one device, got {q.device}, {kv.device}, "
                         f"{bias.device}, {sinks.device}")
    if q.stride(2) != 1 or kv.stride(-1) != 1 or bias.stride(-1) != 1:
        raise ValueError(f"{name}: the last dims of q, kv and bias must be contiguous (strides {q.stride()}, "
                         f"{kv.stride()}, {bias.stride()})")
    out = torch.empty_like(q)
    K = bias.shape[1]
    if n == 0 or H == 0:
        return out
    interp_or_fp32 = triton_interpreted() or q.dtype == torch.float32
    dot_dtype = tl.float32 if interp_or_fp32 else _TL_FLOAT[q.dtype]
    cfg = attention_launch_settings(H, d, q.dtype, fp8 is not None)
    head_dim, rope_dim = fp8 or (d, 0)
    launch(_sink_attention_kernel, (n, triton.cdiv(H, cfg["BLOCK_H"])),
           q, kv, bias, sinks.contiguous(), out, H, K, d, float(scale),
           q.stride(0), q.stride(1), stride_kn, kv.stride(-2), bias.stride(0), out.stride(0), out.stride(1),
           DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
           KV_FP8=fp8 is not None, NOPE=head_dim - rope_dim, ROPE=rope_dim, **cfg)
    record_triton_call(name)
    return out


def sparse_sink_attention_triton(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """Triton form of `sparse_sink_attention_ref`: q [n, H, d], kv [n, K, d], bias [n, K], sinks [H] -> [n, H, d]
    in q's dtype (fp32 softmax and accumulation)."""
    return _launch_sink_attention(q, kv, kv.stride(0), bias, sinks, scale, "sparse_sink_attention")


def sink_attention_triton(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Triton form of `sink_attention_ref` (q [T, H, d], kv [S, d], bias [T, S]): the decode kernel with every
    query row reading the same keys. Not query-tiled: each (row, head block) program streams the keys not
    masked for it, so it suits windowed/sparse bias patterns, not dense long prefill."""
    return _launch_sink_attention(q, kv, 0, bias, sinks, scale, "sink_attention")


def sparse_sink_attention_fp8_ref(q: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                                  scale: float, head_dim: int, rope_dim: int) -> torch.Tensor:
    """`sparse_sink_attention_ref` over FP8-packed keys: unpack them to q's dtype (kv_fp8.unpack_main_ref), then
    attend. packed [n, K, entry_bytes] uint8 -> [n, H, head_dim]."""
    return sparse_sink_attention_ref(q, unpack_main_ref(packed, head_dim, rope_dim, q.dtype), bias, sinks, scale)


def sparse_sink_attention_fp8_triton(q: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                                     scale: float, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Triton form of `sparse_sink_attention_fp8_ref`: the kernel reads the packed entries and dequantizes them in
    registers (to q's dtype for the dots, as the reference's unpack does)."""
    name = "sparse_sink_attention_fp8"
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[2] != main_entry_bytes(head_dim, rope_dim):
        raise ValueError(f"{name}: packed keys must be uint8 [n, K, {main_entry_bytes(head_dim, rope_dim)}] "
                         f"(head_dim {head_dim}, rope_dim {rope_dim}); got {packed.dtype} {list(packed.shape)}")
    if packed.stride(0) % 2 or packed.stride(1) % 2 or (head_dim - rope_dim) % 2:
        raise ValueError(f"{name}: entry strides {packed.stride()[:2]} must be even (bf16 rope dims are read in "
                         f"place); pass the gathered entries contiguous")
    return _launch_sink_attention(q, packed, packed.stride(0), bias, sinks, scale, name, fp8=(head_dim, rope_dim))


def sparse_sink_attention_fp8(q: torch.Tensor, packed_keys: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                              scale: float, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Dispatch point for sparse decode attention over gathered FP8 cache entries (the KV cache's "fp8" format,
    kernels/kv_fp8.py): q [n, H, head_dim], packed_keys [n, K, entry_bytes] uint8, bias [n, K], sinks [H] ->
    [n, H, head_dim] in q's dtype. Triton dequantizes in registers; the torch reference unpacks, then attends."""
    n, H, d = q.shape
    if packed_keys.dim() != 3 or packed_keys.shape[0] != n or d != head_dim or bias.shape != packed_keys.shape[:2] \
            or sinks.shape != (H,):
        raise ValueError(f"sparse_sink_attention_fp8: q [n,H,head_dim]={tuple(q.shape)} (head_dim {head_dim}), "
                         f"packed_keys [n,K,bytes]={tuple(packed_keys.shape)}, bias [n,K]={tuple(bias.shape)}, "
                         f"sinks [H]={tuple(sinks.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        return sparse_sink_attention_fp8_triton(q, packed_keys, bias, sinks, scale, head_dim, rope_dim)
    return sparse_sink_attention_fp8_ref(q, packed_keys, bias, sinks, scale, head_dim, rope_dim)


def sparse_sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Dispatch point for sparse decode attention over per-query gathered keys: Triton or the torch reference."""
    n, H, d = q.shape
    if kv.dim() != 3 or kv.shape[0] != n or kv.shape[2] != d or bias.shape != kv.shape[:2] or sinks.shape != (H,):
        raise ValueError(f"sparse_sink_attention: q [n,H,d]={tuple(q.shape)}, kv [n,K,d]={tuple(kv.shape)}, "
                         f"bias [n,K]={tuple(bias.shape)}, sinks [H]={tuple(sinks.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        return sparse_sink_attention_triton(q, kv, bias, sinks, scale)
    if attention_cpu.native_applies(q, kv):   # one opaque call, also inside a compiled step
        return torch.ops.v4ray.sparse_sink_attention(q, kv, bias, sinks, float(scale))
    return sparse_sink_attention_ref(q, kv, bias, sinks, scale)


def _sparse_sink_attention_impl(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                                scale: float) -> torch.Tensor:
    out = attention_cpu.sparse_sink_attention(q, kv, bias, sinks, scale)
    return sparse_sink_attention_ref(q, kv, bias, sinks, scale) if out is None else out


def _sparse_sink_attention_shape(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


# the CPU's native kernel (kernels/attention_cpu.py) as an operator, as kernels/paged_cpu.py registers its own
if not hasattr(torch.ops.v4ray, "sparse_sink_attention"):
    _LIB_SPARSE = torch.library.Library("v4ray", "FRAGMENT")
    _LIB_SPARSE.define("sparse_sink_attention(Tensor q, Tensor kv, Tensor bias, Tensor sinks, float scale) -> Tensor")
    _LIB_SPARSE.impl("sparse_sink_attention", _sparse_sink_attention_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("v4ray::sparse_sink_attention", _sparse_sink_attention_shape, lib=_LIB_SPARSE)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Dispatch point for sparse attention over window + compressed entries: Triton or the torch reference.
    Stacked groups (q [G, T, H, d], kv [G, S, d]: `sink_attention_ref`) are a torch-backend form."""
    stacked = q.dim() == 4
    T, H, d = q.shape[-3:]
    lead = q.shape[:1] if stacked else ()
    if (q.dim() not in (3, 4) or kv.shape[:-2] != lead or kv.dim() != 2 + stacked or kv.shape[-1] != d
            or bias.shape[-2:] != (T, kv.shape[-2]) or bias.dim() > q.dim() - 1 or sinks.shape != (H,)):
        raise ValueError(f"sink_attention: q [(G,)T,H,d]={tuple(q.shape)}, kv [(G,)S,d]={tuple(kv.shape)}, "
                         f"bias [(G,)T,S]={tuple(bias.shape)}, sinks [H]={tuple(sinks.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        if stacked:
            raise ValueError("sink_attention: stacked groups are a torch-backend form (the Triton kernel takes "
                             "one group: q [T,H,d], kv [S,d])")
        return sink_attention_triton(q, kv, bias, sinks, scale)
    return sink_attention_ref(q, kv, bias, sinks, scale)
