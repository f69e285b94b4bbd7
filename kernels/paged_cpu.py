"""The decode-time indexer scores on the CPU, read where the keys live: a small native kernel built at first use.

At long context a CSA layer's decode step scores every closed window of each sequence (8192 index keys per row at
32K tokens with a compression of 4). The torch formulation gathers the keys through the block tables into a copy
([n, blocks x entries, dI], 2 MiB per row and layer for v4-tiny at 32K), then scores the copy in a GEMM: the keys
cross memory three times (read, write, read again), and inductor cannot fuse a gather into a GEMM. This kernel reads
each block of keys in place through the block table (int64 offsets) and scores it against all heads at once
(heads in one SIMD vector per 16, eight entries in flight), ReLU, head weights, sum over heads: the paged reading
the GPU path's Triton kernel does, for the CPU (docs/architecture.md §12).

It is C++ built at first use for this machine (kernels/native_cpu.py), OpenMP over (row, block) pairs. Where it
cannot be built (no compiler) or does not apply (keys not fp32, heads not a multiple of 16, dI above 256, tensors
not on the CPU), the op computes the same scores with torch (gather + GEMM), its reference (tests/test_kernels.py).

`torch.ops.v4ray.paged_index_scores` is an operator of its own (registered like `kernels/moe.py`'s grouped GEMM)
so that a compiled decode step calls it as one opaque call.
"""

from __future__ import annotations

import ctypes

import torch

from . import native_cpu
from .kv_fp8 import unpack_index_ref

HEADS_PER_VECTOR = 16    # index heads scored in one SIMD vector (the kernel's `H`; more heads: groups of 16)
MAX_INDEX_DIM = 256      # dI bound of the kernel's per-thread transposed query ([dI][16] floats on its stack)

_SOURCE = r"""
#include <stdint.h>
typedef float v16 __attribute__((vector_size(64)));
#define H 16
#define T 8
/* scores[r, b * E + e] = sum_h w[r, h] * relu(<pool[tables[r, b], e, :], q[r, h, :]>) * scale, for every row r < n,
   table column b < W, entry e < E. Heads in vectors of 16 (G groups), T entries in flight. Returns the number of
   table entries outside [0, num_blocks) (nothing is read for them; their scores are 0). */
extern "C" int64_t paged_index_scores(const float* pool, int64_t num_blocks, const int64_t* tables,
                                      const float* q, const float* w, float* out, int64_t n, int64_t W,
                                      int64_t E, int64_t D, int64_t G, float scale) {
    int64_t bad = 0;
    #pragma omp parallel for collapse(2) schedule(static) reduction(+:bad)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t b = 0; b < W; b++) {
            float* o = out + (r * W + b) * E;
            int64_t blk_id = tables[r * W + b];
            if (blk_id < 0 || blk_id >= num_blocks) {
                for (int64_t e = 0; e < E; e++) o[e] = 0.f;
                bad += 1;
                continue;
            }
            const float* blk = pool + blk_id * E * D;
            for (int64_t e = 0; e < E; e++) o[e] = 0.f;
            for (int64_t g = 0; g < G; g++) {
                v16 qt[256];                                         /* this head group's queries, [D][16] */
                for (int64_t d = 0; d < D; d++)
                    for (int h = 0; h < H; h++) qt[d][h] = q[(r * G * H + g * H + h) * D + d];
                const float* wr = w + r * G * H + g * H;
                int64_t e = 0;
                for (; e + T <= E; e += T) {
                    const float* k = blk + e * D;
                    v16 a[T];
                    for (int t = 0; t < T; t++) a[t] = (v16){0};
                    for (int64_t d = 0; d < D; d++) {
                        v16 qd = qt[d];
                        #pragma GCC unroll 8
                        for (int t = 0; t < T; t++) a[t] += k[t * D + d] * qd;
                    }
                    for (int t = 0; t < T; t++) {
                        float s = 0.f;
                        for (int h = 0; h < H; h++) s += (a[t][h] > 0.f ? a[t][h] : 0.f) * scale * wr[h];
                        o[e + t] += s;
                    }
                }
                for (; e < E; e++) {
                    const float* k = blk + e * D;
                    v16 a = (v16){0};
                    for (int64_t d = 0; d < D; d++) a += k[d] * qt[d];
                    float s = 0.f;
                    for (int h = 0; h < H; h++) s += (a[h] > 0.f ? a[h] : 0.f) * scale * wr[h];
                    o[e] += s;
                }
            }
        }
    }
    return bad;
}
"""

def _build():
    """The kernel built for this machine (kernels/native_cpu.py), or None where it cannot be built."""
    return native_cpu.load("paged_index_scores", _SOURCE, ctypes.c_int64,
                           [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_float])


def native_applies(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether the native kernel takes these operands (else the op's torch formulation runs)."""
    h, d = q.shape[-2:]
    return (q.device.type == "cpu" and pool.device.type == "cpu" and pool.dtype == torch.float32
            and h % HEADS_PER_VECTOR == 0 and d <= MAX_INDEX_DIM
            and pool.dim() == 3 and pool.shape[-1] == d)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The indexer's scores of each row's own keys in torch, the reference formula: q [n, h, dI], keys [n, E, dI],
    weights [n, h] -> [n, E] fp32, I = sum_h w_h * ReLU(q_h . k) * dI^-1/2."""
    # keys as the GEMM's tall left operand ([E, dI] x [dI, h] per row), heads last: at 32K tokens (8192 entries)
    # this GEMM reads the gathered keys once at ~2/3 the time of [h, dI] x [dI, E] (docs/architecture.md §12)
    scores = torch.einsum("ned,nhd->neh", keys.float(), q.float()).relu() * (q.shape[-1] ** -0.5)
    return (scores * weights.float()[:, None, :]).sum(dim=-1)


def paged_index_scores_ref(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """The torch formulation: keys gathered through the tables (FP8-packed ones unpacked), `index_scores`."""
    keys = pool[tables].flatten(1, 2)                                                # [n, W * E, *]
    return index_scores(q, unpack_index_ref(keys, torch.float32) if pool.dtype == torch.uint8 else keys, weights)


def _paged_index_scores_impl(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    fn = _build() if native_applies(q, pool) else None
    if fn is None:
        return paged_index_scores_ref(q, pool, tables, weights)
    n, h, d = q.shape
    W, E = tables.shape[1], pool.shape[1]
    # a decode step's operands come as the kernel takes them: check before converting (a call costs microseconds)
    if q.dtype != torch.float32 or not q.is_contiguous():
        q = q.float().contiguous()
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    if tables.dtype != torch.int64 or not tables.is_contiguous():
        tables = tables.to(torch.int64).contiguous()
    if not pool.is_contiguous():
        pool = pool.contiguous()
    out = torch.empty(n, W * E, dtype=torch.float32)
    bad = fn(pool.data_ptr(), pool.shape[0], tables.data_ptr(), q.data_ptr(), weights.data_ptr(), out.data_ptr(),
             n, W, E, d, h // HEADS_PER_VECTOR, d ** -0.5)
    if bad:
        raise IndexError(f"paged_index_scores: {bad} block table entries outside the pool's {pool.shape[0]} blocks")
    return out


def _paged_index_scores_shape(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor,
                              weights: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[0], tables.shape[1] * pool.shape[1], dtype=torch.float32)


if not hasattr(torch.ops.v4ray, "paged_index_scores"):
    _LIB = torch.library.Library("v4ray", "FRAGMENT")
    _LIB.define("paged_index_scores(Tensor q, Tensor pool, Tensor tables, Tensor weights) -> Tensor")
    _LIB.impl("paged_index_scores", _paged_index_scores_impl, "CompositeExplicitAutograd")
    torch.library.register_fake("v4ray::paged_index_scores", _paged_index_scores_shape, lib=_LIB)


def paged_index_scores(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """q [n, h, dI] (RoPE'd index queries), pool [blocks, E, dI] (a layer's index keys, E per token block; FP8-packed
    uint8 [blocks, E, dI + 4] keys take the torch formulation), tables
    [n, W] block numbers, weights [n, h] (scaled by h^-1/2) -> [n, W * E] fp32: column b * E + e scores entry e of
    row n's table block b, I = sum_h w_h * ReLU(q_h . k) * dI^-1/2, with the keys read in place."""
    return torch.ops.v4ray.paged_index_scores(q, pool, tables, weights)
