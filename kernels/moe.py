"""Routed-expert MLP over tokens grouped by expert (the compute step of expert parallelism).

Expert_e(x) = W2_e (SiLU(min(W1_e x, limit)) * clamp(W3_e x, -limit, limit)), scaled by the routing weight
after W2 (transformers' order; docs/v4_model.md §2.5, §6.10).

Triton path: rows are sorted by expert and cut into tiles of BLOCK_M rows of one expert; a first kernel computes
the clamped SwiGLU of both gate/up GEMMs per (tile, intermediate block), a second the down GEMM times the routing
weight, scattered back to the caller's row order. Expert weights stay where they are: the kernels read them
through per-expert pointer tables and dequantize FP8 (128x128 block scales, applied to each partial product) and
FP4 (e2m1 nibbles times per-32 scales, decoded in registers) inside the GEMM loop.

Torch, device-side grouping (`expert_mlp_grouped`): the token slots sorted by expert on the device, group offsets
from a search over the sorted ids, and one grouped GEMM per projection (`grouped_mm`, torch's `_grouped_mm`) over
the experts' stacked weights. No host read and no data-dependent shape, so it compiles with `fullgraph=True` (the
CPU's stand-in for a CUDA graph), and it computes only the routed rows. The caller picks it for plain weights
(model/v4.py `MoE.route`); `expert_mlp_ref` (sort, per-expert loop, host reads) stays the reference and the path
of experts kept quantized. A CPU decode step's few fp32 rows go to a native kernel instead (kernels/moe_cpu.py,
`expert_mlp_rows`): one BLAS call per expert costs more than its arithmetic there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import moe_cpu
from .backend import kernel_backend, launch, record_triton_call, triton_interpreted
from .quant import FP4_BLOCK, FP8_BLOCK, QuantTensor


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


# ---- torch, static shapes ------------------------------------------------------------------------------------

def stack_experts(experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain expert weights of experts 0..E-1 (in id order) -> (w13 [E, 2I, D]: W1 rows then W3 rows, w2 [E, D, I]).
    Quantized (FP8/FP4) weights are not stacked: the dense form would dequantize all of them every step."""
    triples = [experts[e] for e in sorted(experts)]
    if any(w.fmt is not None for t in triples for w in t):
        raise ValueError("stack_experts: quantized expert weights stay per expert (expert_mlp)")
    w13 = torch.stack([torch.cat([w1.data, w3.data]) for w1, _, w3 in triples])
    w2 = torch.stack([w2.data for _, w2, _ in triples])
    return w13, w2


def _grouped_mm_impl(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.device.type == "cpu" or a.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))])


def _grouped_mm_shape(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


# `grouped_mm` is an operator of its own so that inductor treats it as one opaque call (`_grouped_mm`'s own shape
# function accepts bf16 only). Registered with `torch.library.Library`, not `torch.library.custom_op`: the latter's
# Python autograd and dispatch layers cost ~50 us a call inside a compiled CPU graph (its cpp wrapper calls back
# into Python), this ~20 us, against ~60 us for the whole GEMM of a 32-row decode step (docs/architecture.md §12).
# Defined once per process: this file can be imported a second time under another name (transformers probes for a
# package named `kernels` and imports this repository's top-level `kernels/` when it is on sys.path), and an
# operator's schema may be defined only once.
_LIB = None
if not hasattr(torch.ops.v4ray, "grouped_mm"):
    _LIB = torch.library.Library("v4ray", "FRAGMENT")
    _LIB.define("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor")
    _LIB.impl("grouped_mm", _grouped_mm_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("v4ray::grouped_mm", _grouped_mm_shape, lib=_LIB)


def _expert_mlp_rows_impl(x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                          w2: torch.Tensor, limit: float) -> torch.Tensor:
    y = moe_cpu.expert_mlp_rows(x, offs, weights, w13, w2, limit)
    return expert_mlp_grouped_ref(x, offs, weights, w13, w2, limit) if y is None else y


def _expert_mlp_rows_shape(x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                           w2: torch.Tensor, limit: float) -> torch.Tensor:
    return x.new_empty(x.shape)


# The native expert MLP (kernels/moe_cpu.py) as one opaque call in a compiled CPU step, registered as `grouped_mm` is.
if not hasattr(torch.ops.v4ray, "expert_mlp_rows"):
    _LIB_ROWS = torch.library.Library("v4ray", "FRAGMENT")
    _LIB_ROWS.define("expert_mlp_rows(Tensor x, Tensor offs, Tensor weights, Tensor w13, Tensor w2, float limit) "
                     "-> Tensor")
    _LIB_ROWS.impl("expert_mlp_rows", _expert_mlp_rows_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("v4ray::expert_mlp_rows", _expert_mlp_rows_shape, lib=_LIB_ROWS)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] with rows grouped (group g: rows offs[g-1]..offs[g], offs int32 [G] ending at M), b [G, K, N] ->
    [M, N], each group's rows times its own b[g]. torch's `_grouped_mm` on the CPU and for bf16 on CUDA; a loop
    over the groups elsewhere (it reads `offs` on the host, so it has no place in a CUDA graph)."""
    return torch.ops.v4ray.grouped_mm(a, b, offs)


class StackedExperts:
    """A set of experts (any global ids) stacked for `expert_mlp_grouped`, for callers that hold experts by id
    (an expert shard): `local` maps a global id to its index in the stacks. Built with `stacked`."""

    def __init__(self, experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]):
        ids = sorted(experts)
        self.w13, self.w2 = stack_experts(experts)
        self.local = torch.full((ids[-1] + 1,), -1, dtype=torch.long, device=self.w13.device)
        self.local[ids] = torch.arange(len(ids), device=self.w13.device)
        I = self.w13.shape[1] // 2
        for i, e in enumerate(ids):   # the caller's experts become views of the stacks: one copy of the weights
            experts[e] = (QuantTensor(self.w13[i, :I]), QuantTensor(self.w2[i]), QuantTensor(self.w13[i, I:]))

    @staticmethod
    def stacked(experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]) -> "StackedExperts | None":
        """The stacks where the experts run grouped: plain fp32 weights on the CPU's torch backend (where
        `expert_mlp` runs the per-expert reference: a host read and one GEMM per expert and weight); else None."""
        weights = [w for t in experts.values() for w in t]
        if (not weights or any(w.fmt is not None or w.data.dtype != torch.float32 or w.data.device.type != "cpu"
                               for w in weights) or kernel_backend(weights[0].data.device) != "torch"):
            return None
        return StackedExperts(experts)

    def __call__(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, limit: float) -> torch.Tensor:
        """As `expert_mlp`: rows x [M, D] in any order, global expert ids [M], routing weights [M] -> [M, D]."""
        local = self.local[expert_idx]
        order = torch.argsort(local, stable=True)
        y = expert_mlp_grouped(x[order], expert_offsets(local[order], self.w13.shape[0]), weights[order], self.w13,
                               self.w2, limit)
        return torch.empty_like(y).index_copy_(0, order, y)


def expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids sorted ascending [M] -> int32 [E]: the end of each expert's rows (an expert without rows ends
    where the one before it does). A search on the device: fixed shape, no host read."""
    experts = torch.arange(num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)


def expert_mlp_grouped(x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor, limit: float, native: bool = True) -> torch.Tensor:
    """Rows grouped by expert: x [M, D], their group ends offs [E] (`expert_offsets`), routing weights [M] and the
    stacked weights (`stack_experts`) -> [M, D] weighted expert outputs in x's dtype, as `expert_mlp_ref` (one
    gate/up GEMM for W1 and W3 together: the same dot products). native: fp32 rows on the CPU go to one opaque
    operator that runs the native kernel for a decode step's few rows (kernels/moe_cpu.py) and the grouped GEMMs
    for more; False keeps the grouped GEMMs in the caller's graph (a compiled prefill region)."""
    if native and moe_cpu.native_applies(x, w13, w2):
        return torch.ops.v4ray.expert_mlp_rows(x, offs, weights, w13, w2, float(limit))
    return expert_mlp_grouped_ref(x, offs, weights, w13, w2, limit)


def expert_mlp_grouped_ref(x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                           w2: torch.Tensor, limit: float) -> torch.Tensor:
    """`expert_mlp_grouped` in torch: two grouped GEMMs and the clamped SwiGLU between them."""
    I = w13.shape[1] // 2
    gu = grouped_mm(x, w13.to(x.dtype).transpose(1, 2), offs)              # [M, 2I]
    h = swiglu_clamped(gu[:, :I], gu[:, I:], limit)
    return grouped_mm(h, w2.to(x.dtype).transpose(1, 2), offs) * weights[:, None].to(x.dtype)


# ---- Triton ----------------------------------------------------------------------------------------------------

_FMT_CODE = {None: 0, "fp8": 1, "fp4": 2}


@triton.jit
def _weight_tile(w_ptr, s_ptr, n, k, k0, n_mask, K, stride_w, stride_s,
                 FMT: tl.constexpr, SCALE_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W[n, k]^T of one expert's [N, K] weight as fp32, and (FP8 only) the [BLOCK_N]
    block scales of this k-step, applied by the caller to the partial product."""
    mask = n_mask[None, :] & (k[:, None] < K)
    if FMT == 2:  # FP4: byte k // 2 of row n, low nibble = even k; ue8m0 scale per 32 inputs
        byte = tl.load(w_ptr + n[None, :] * stride_w + k[:, None] // 2, mask=mask, other=0).to(tl.int32) & 0xFF
        code = (byte >> ((k[:, None] & 1) * 4)) & 0xF
        e = (code >> 1) & 3
        m = (code & 1).to(tl.float32)
        mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0)))
        val = tl.where((code & 8) != 0, -mag, mag)
        sb = tl.load(s_ptr + n[None, :] * stride_s + k[:, None] // SCALE_K, mask=mask, other=127).to(tl.int32)
        w = val * (sb << 23).to(tl.float32, bitcast=True)  # ue8m0 byte b -> 2^(b-127), exact for b >= 1
        scale = tl.zeros_like(n).to(tl.float32) + 1.0
    else:
        w = tl.load(w_ptr + n[None, :] * stride_w + k[:, None], mask=mask, other=0.0).to(tl.float32)
        if FMT == 1:  # FP8: one ue8m0 scale per 128x128 block; the k-tile lies inside one block column
            sb = tl.load(s_ptr + (n // SCALE_K) * stride_s + k0 // SCALE_K, mask=n_mask, other=127).to(tl.int32)
            scale = (sb << 23).to(tl.float32, bitcast=True)
        else:
            scale = tl.zeros_like(n).to(tl.float32) + 1.0
    return w, scale


@triton.jit
def _moe_gate_up_kernel(x_ptr, order_ptr, tile_group_ptr, tile_row0_ptr, tile_row1_ptr,
                        w1_ptrs, w3_ptrs, s1_ptrs, s3_ptrs, h_ptr,
                        D, I, stride_xm, stride_hm, stride_w, stride_s, limit,
                        FMT: tl.constexpr, W_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        PRECISION: tl.constexpr, SCALE_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[r, n] = SiLU(min(x W1^T, limit)) * clamp(x W3^T, +-limit) for the sorted rows r of one expert tile."""
    g = tl.load(tile_group_ptr + tl.program_id(0))
    if g >= 0:  # the grid is an upper bound on the tile count; spare programs do nothing
        row0 = tl.load(tile_row0_ptr + tl.program_id(0))
        row1 = tl.load(tile_row1_ptr + tl.program_id(0))
        rows = row0 + tl.arange(0, BLOCK_M)                                   # sorted row ids
        m_mask = rows < row1
        src = tl.load(order_ptr + rows, mask=m_mask, other=0)                 # caller's row ids
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < I
        w1 = tl.load(w1_ptrs + g).to(tl.pointer_type(W_DTYPE))
        w3 = tl.load(w3_ptrs + g).to(tl.pointer_type(W_DTYPE))
        s1 = tl.load(s1_ptrs + g).to(tl.pointer_type(tl.uint8))
        s3 = tl.load(s3_ptrs + g).to(tl.pointer_type(tl.uint8))
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + src[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k[None, :] < D),
                         other=0.0).to(tl.float32).to(DOT_DTYPE)                       # [BM, BK]
            wt, sc = _weight_tile(w1, s1, n, k, k0, n_mask, D, stride_w, stride_s, FMT, SCALE_K)
            gate += tl.dot(xt, wt.to(DOT_DTYPE), input_precision=PRECISION) * sc[None, :]
            wt, sc = _weight_tile(w3, s3, n, k, k0, n_mask, D, stride_w, stride_s, FMT, SCALE_K)
            up += tl.dot(xt, wt.to(DOT_DTYPE), input_precision=PRECISION) * sc[None, :]
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + rows[:, None] * stride_hm + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, order_ptr, weight_ptr, tile_group_ptr, tile_row0_ptr, tile_row1_ptr,
                     w2_ptrs, s2_ptrs, out_ptr,
                     D, I, stride_hm, stride_om, stride_w, stride_s,
                     FMT: tl.constexpr, W_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr, SCALE_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[src(r), n] = routing_weight[src(r)] * (h W2^T)[r, n], scattered back to the caller's row order."""
    g = tl.load(tile_group_ptr + tl.program_id(0))
    if g >= 0:
        row0 = tl.load(tile_row0_ptr + tl.program_id(0))
        row1 = tl.load(tile_row1_ptr + tl.program_id(0))
        rows = row0 + tl.arange(0, BLOCK_M)
        m_mask = rows < row1
        src = tl.load(order_ptr + rows, mask=m_mask, other=0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < D
        w2 = tl.load(w2_ptrs + g).to(tl.pointer_type(W_DTYPE))
        s2 = tl.load(s2_ptrs + g).to(tl.pointer_type(tl.uint8))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ht = tl.load(h_ptr + rows[:, None] * stride_hm + k[None, :], mask=m_mask[:, None] & (k[None, :] < I),
                         other=0.0).to(tl.float32).to(DOT_DTYPE)
            wt, sc = _weight_tile(w2, s2, n, k, k0, n_mask, I, stride_w, stride_s, FMT, SCALE_K)
            acc += tl.dot(ht, wt.to(DOT_DTYPE), input_precision=PRECISION) * sc[None, :]
        # the reference rounds the expert output to x's dtype before the weight multiply
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        wgt = tl.load(weight_ptr + src, mask=m_mask, other=0.0).to(tl.float32).to(out_ptr.dtype.element_ty)
        out = acc * wgt.to(tl.float32)[:, None]
        tl.store(out_ptr + src[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float8_e4m3fn: tl.float8e4nv, torch.int8: tl.uint8, torch.uint8: tl.uint8}
_POINTER_TABLES: dict[tuple, torch.Tensor] = {}  # device-side tables by the host values they hold


def _pointer_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 [G] of data pointers, cached by the pointers themselves (an upload per call would sync the GPU)."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (str(device), ptrs)
    table = _POINTER_TABLES.get(key)
    if table is None:
        if len(_POINTER_TABLES) >= 1024:
            _POINTER_TABLES.clear()
        table = _POINTER_TABLES[key] = torch.tensor(ptrs, dtype=torch.int64, device=device)
    return table


def _expert_slots(keys: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Global expert id -> position in `keys` (-1 elsewhere), cached: building it per call would upload (sync)."""
    key = ("slots", str(device), keys)
    lut = _POINTER_TABLES.get(key)
    if lut is None:
        lut = torch.full((max(keys) + 1,), -1, dtype=torch.long)
        lut[list(keys)] = torch.arange(len(keys))
        lut = _POINTER_TABLES[key] = lut.to(device)
    return lut


def _check_experts(experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]], D: int, device: torch.device):
    """All experts share one format, weight dtype and shape, contiguous on x's device -> (fmt, I)."""
    first = next(iter(experts.values()))
    fmt, dtype, I = first[0].fmt, first[0].data.dtype, first[0].shape[0]
    if fmt not in _FMT_CODE:
        raise ValueError(f"expert_mlp_triton: unknown weight format {fmt!r}")
    expect = {"w1": (I, D), "w2": (D, I), "w3": (I, D)}
    for e, triple in experts.items():
        for name, w in zip(("w1", "w2", "w3"), triple):
            if w.fmt != fmt or w.data.dtype != dtype:
                raise ValueError(f"expert_mlp_triton: expert {e} {name} is {w.fmt or 'plain'}/{w.data.dtype}, expert "
                                 f"{next(iter(experts))} w1 is {fmt or 'plain'}/{dtype}: one format per call")
            if tuple(w.shape) != expect[name]:
                raise ValueError(f"expert_mlp_triton: expert {e} {name} is {list(w.shape)}, expected "
                                 f"{list(expect[name])} (x has D={D}, w1 has I={I})")
            if not w.data.is_contiguous() or w.data.device != device:
                raise ValueError(f"expert_mlp_triton: expert {e} {name} must be contiguous on {device}")
            if fmt is not None and (w.scale is None or not w.scale.is_contiguous() or w.scale.dtype != torch.uint8):
                raise ValueError(f"expert_mlp_triton: expert {e} {name} needs contiguous uint8 ue8m0 scales")
    if dtype not in _TL_DTYPES:
        raise ValueError(f"expert_mlp_triton: weight dtype {dtype} is not supported")
    return fmt, I


def _tile_schedule(slot: torch.Tensor, G: int, block_m: int):
    """Rows sorted by expert slot, cut into tiles of <= block_m rows of one expert, computed on the device (no
    host sync): -> order [M], per-tile (group or -1, first sorted row, end row of its group), grid size."""
    M = slot.shape[0]
    order = torch.argsort(slot, stable=True)
    counts = torch.zeros(G, dtype=torch.long, device=slot.device).scatter_add_(0, slot, torch.ones_like(slot))
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    num_tiles = triton.cdiv(M, block_m) + G  # sum_g ceil(c_g / BM) <= ceil(M / BM) + G
    t = torch.arange(num_tiles, device=slot.device)
    g = torch.searchsorted(tile_end, t, right=True)
    gc = g.clamp(max=G - 1)
    row0 = starts[gc] + (t - (tile_end[gc] - tiles[gc])) * block_m
    row1 = starts[gc] + counts[gc]
    group = torch.where(g < G, gc, -1).to(torch.int32)
    return order, group, row0.to(torch.int32), row1.to(torch.int32), num_tiles


def moe_launch_settings(rows_per_expert: float, x_dtype: torch.dtype) -> dict:
    """Tile sizes and warps of both expert GEMM kernels (the only place they are chosen; kernels/aot.py compiles
    what the wrapper launches with them, and checks: no register spills, tensor-core dots for bf16 at every tile).

    BLOCK_M follows the rows per expert (decode: 16, the smallest tl.dot tile). 8 warps and a 64-deep k-step keep
    the two dequantized [BLOCK_K, BLOCK_N] weight tiles of gate_up in registers (4 warps x 128 spilled); fp32 dots
    run on FMA units with both operands in registers, hence a 16-deep k-step. BLOCK_K divides 128, so each FP8 k-step
    lies in one scale block."""
    block_m = 16 if rows_per_expert <= 16 else (32 if rows_per_expert <= 64 else 64)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=16 if x_dtype == torch.float32 else 64, num_warps=8)


def expert_mlp_triton(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor,
                      experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]], limit: float) -> torch.Tensor:
    """Grouped expert GEMM in Triton; same contract as `expert_mlp_ref`. Expert weights may be plain float,
    FP8 e4m3 with 128x128 ue8m0 block scales, or FP4 e2m1 with per-32 ue8m0 scales (dequantized in-kernel)."""
    M, D = x.shape
    out = torch.zeros_like(x)
    if M == 0:
        return out
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"expert_mlp_triton: x must be fp32/bf16/fp16, got {x.dtype}")
    if not experts:
        raise ValueError("expert_mlp_triton: rows given but no experts")
    if x.stride(1) != 1:
        x = x.contiguous()
    interpreted = triton_interpreted()
    if interpreted and x.is_cuda:
        raise RuntimeError("expert_mlp_triton reads expert weights through pointer tables, which Triton's "
                           "interpreter cannot follow on CUDA tensors; unset TRITON_INTERPRET on a GPU")
    fmt, I = _check_experts(experts, D, x.device)
    keys = list(experts)
    G = len(keys)
    lut = _expert_slots(tuple(keys), x.device)
    idx = expert_idx.long()
    torch._assert_async(((idx >= 0) & (idx < lut.shape[0])).all(),
                        "expert_mlp_triton: an expert_idx is not among the given experts")
    slot = lut[idx.clamp(0, lut.shape[0] - 1)]
    weights = weights.contiguous()
    torch._assert_async((slot >= 0).all(), "expert_mlp_triton: an expert_idx is not among the given experts")

    cfg = moe_launch_settings(M / G, x.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    order, group, row0, row1, num_tiles = _tile_schedule(slot, G, block_m)

    w1s, w2s, w3s = ([experts[e][i] for e in keys] for i in range(3))
    tables = [_pointer_table([w.data for w in ws], x.device) for ws in (w1s, w3s, w2s)]
    scales = ([_pointer_table([w.scale for w in ws], x.device) for ws in (w1s, w3s, w2s)] if fmt is not None
              else tables)
    w_dtype = _TL_DTYPES[w1s[0].data.dtype]
    scale_k = FP8_BLOCK if fmt == "fp8" else FP4_BLOCK
    # bf16/fp16 activations use tensor-core dots; the interpreter (bf16 unsupported) and fp32 use exact fp32.
    interp_or_fp32 = interpreted or x.dtype == torch.float32
    dot_dtype = tl.float32 if interp_or_fp32 else _TL_DTYPES[x.dtype]
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"

    def strides(w: QuantTensor) -> tuple[int, int]:
        return w.data.stride(0), (w.scale.stride(0) if w.scale is not None else 0)

    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    sw, ss = strides(w1s[0])
    launch(_moe_gate_up_kernel, (num_tiles, triton.cdiv(I, block_n)),
        x, order, group, row0, row1, tables[0], tables[1], scales[0], scales[1], h,
        D, I, x.stride(0), h.stride(0), sw, ss, float(limit),
        FMT=_FMT_CODE[fmt], W_DTYPE=w_dtype, DOT_DTYPE=dot_dtype, PRECISION=precision, SCALE_K=scale_k, **cfg)
    sw, ss = strides(w2s[0])
    launch(_moe_down_kernel, (num_tiles, triton.cdiv(D, block_n)),
        h, order, weights, group, row0, row1, tables[2], scales[2], out,
        D, I, h.stride(0), out.stride(0), sw, ss,
        FMT=_FMT_CODE[fmt], W_DTYPE=w_dtype, DOT_DTYPE=dot_dtype, PRECISION=precision, SCALE_K=scale_k, **cfg)
    record_triton_call("expert_mlp")
    return out


def expert_mlp(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor,
               experts: dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]], limit: float) -> torch.Tensor:
    """Dispatch point for the grouped expert GEMM: Triton or the torch reference (see `backend`)."""
    if x.dim() != 2 or expert_idx.shape != x.shape[:1] or weights.shape != x.shape[:1]:
        raise ValueError(f"expert_mlp: x must be [M, D] with expert_idx/weights [M]; got {tuple(x.shape)}, "
                         f"{tuple(expert_idx.shape)}, {tuple(weights.shape)}")
    if kernel_backend(x.device) == "triton":
        return expert_mlp_triton(x, expert_idx, weights, experts, limit)
    return expert_mlp_ref(x, expert_idx, weights, experts, limit)
