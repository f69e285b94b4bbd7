"""The routed experts of a CPU decode step in one native kernel: both GEMMs and the clamped SwiGLU per expert.

A decode step's MoE layer has few rows (batch x top_k: 4 to a few hundred), spread over all experts, so torch's
grouped GEMM (`kernels/moe.py` `grouped_mm`: one BLAS call per expert and projection) spends its time in per-call
overhead: ~100 us for the gate/up projection of 128 rows over 16 experts on the 2-core CI host, where the
arithmetic is ~5 MFLOP. This kernel takes the rows grouped by expert as `expert_mlp_grouped` does and computes, per
expert and tile of 4 rows, the dot products of each row with the expert's W1/W3 rows (SIMD over the hidden
dimension, the weights read in place in their stored layout), the clamped SwiGLU, the W2 products and the routing
weight, in one pass: OpenMP over (expert, chunk of 16 rows) items. A row's result does not depend on the other
rows of the batch (each dot product is summed in the same order whatever the tile holds).

It applies to fp32 operands on the CPU with the hidden and intermediate sizes multiples of 16, in the fixed-shape
decode step and in eager steps, for at most `NATIVE_MAX_SLOTS` rows, checked when the operator runs (the decode
graph's batch size is symbolic); more rows take the grouped GEMMs inside the operator (faster there: measured
crossover between 1K and 2K rows). A compiled prefill region keeps the grouped GEMMs in its graph, where inductor
fuses the SwiGLU. Built at first use (kernels/native_cpu.py); where it cannot be built, the torch formulation runs
(docs/architecture.md §12).
"""

from __future__ import annotations

import ctypes

import torch

from . import native_cpu

NATIVE_MAX_SLOTS = 1024     # rows (token, expert slots) up to which the kernel beats one BLAS call per expert
MAX_INTERMEDIATE = 4096     # the kernel's SwiGLU tile ([4][I] floats on each thread's stack)
SIMD = 16                   # fp32 lanes of the kernel's vectors: hidden and intermediate sizes are multiples

_SOURCE = native_cpu.SIMD_PRELUDE + r"""
#define RT 4        /* rows per tile */
#define CH 16       /* rows per work item */
#define MAXI 4096

/* out[r] = <x[r * ldx ..], w[..]> over K (a multiple of 16) for the nr <= RT rows of a tile */
static inline void dots(const float* x, int64_t ldx, int nr, const float* w, int64_t K, float* out) {
    v16 a[RT];
    for (int r = 0; r < RT; r++) a[r] = (v16){0};
    for (int64_t k = 0; k < K; k += 16) {
        v16 wv = ld(w + k);
        for (int r = 0; r < RT; r++) if (r < nr) a[r] += wv * ld(x + r * ldx + k);
    }
    for (int r = 0; r < nr; r++) out[r] = hsum(a[r]);
}
/* x [M, D]: rows grouped by expert (expert e owns rows offs[e-1]..offs[e]); w13 [E, 2I, D] (W1 rows, then W3),
   w2 [E, D, I] -> y[r] = wts[r] * W2_e (silu(min(W1_e x_r, L)) * clamp(W3_e x_r, -L, L)).
   Returns 0, or -1 for offsets that are not ascending within [0, M] (nothing written). */
extern "C" int64_t expert_mlp_rows(const float* x, const int32_t* offs, const float* wts, const float* w13,
                                   const float* w2, float* y, int64_t M, int64_t E, int64_t D, int64_t I,
                                   float limit) {
    int64_t n = 0, prev = 0;
    for (int64_t e = 0; e < E; e++) {
        if (offs[e] < prev || offs[e] > M) return -1;
        n += (offs[e] - prev + CH - 1) / CH;
        prev = offs[e];
    }
    int64_t* items = (int64_t*)malloc(sizeof(int64_t) * 3 * (n + 1));
    if (!items) return -2;
    int64_t k = 0;
    prev = 0;
    for (int64_t e = 0; e < E; e++) {
        for (int64_t s = prev; s < offs[e]; s += CH) {
            items[3 * k] = e; items[3 * k + 1] = s; items[3 * k + 2] = s + CH < offs[e] ? s + CH : offs[e];
            k++;
        }
        prev = offs[e];
    }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it = 0; it < n; it++) {
        const int64_t e = items[3 * it], s = items[3 * it + 1], t = items[3 * it + 2];
        const float* W = w13 + e * 2 * I * D;
        const float* V = w2 + e * D * I;
        float h[RT * MAXI];
        for (int64_t r = s; r < t; r += RT) {
            const int nr = t - r < RT ? (int)(t - r) : RT;
            float g[RT], u[RT], o[RT];
            for (int64_t i = 0; i < I; i++) {
                dots(x + r * D, D, nr, W + i * D, D, g);
                dots(x + r * D, D, nr, W + (I + i) * D, D, u);
                for (int q = 0; q < nr; q++) {
                    const float a = g[q] < limit ? g[q] : limit;
                    const float b = u[q] < -limit ? -limit : (u[q] > limit ? limit : u[q]);
                    h[q * I + i] = a / (1.f + expf(-a)) * b;
                }
            }
            for (int64_t d = 0; d < D; d++) {
                dots(h, I, nr, V + d * I, I, o);
                for (int q = 0; q < nr; q++) y[(r + q) * D + d] = o[q] * wts[r + q];
            }
        }
    }
    free(items);
    return 0;
}
"""


def _build():
    """The kernel built for this machine (kernels/native_cpu.py), or None where it cannot be built."""
    return native_cpu.load("expert_mlp_rows", _SOURCE, ctypes.c_int64,
                           [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_float])


def native_applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the kernel takes operands of these dtypes, devices and sizes, whatever the row count (a step's
    operator decides that when it runs: `expert_mlp_rows`; a traced step's rows may be symbolic)."""
    D, I = x.shape[-1], w2.shape[-1]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, w13, w2))
            and D % SIMD == 0 and I % SIMD == 0 and I <= MAX_INTERMEDIATE
            and tuple(w13.shape[1:]) == (2 * I, D) and tuple(w2.shape[1:]) == (D, I))


def expert_mlp_rows(x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, limit: float) -> torch.Tensor | None:
    """The kernel on operands `native_applies` accepted -> y [M, D]; None for more than NATIVE_MAX_SLOTS rows
    (the grouped GEMMs are faster there) or where it could not be built."""
    fn = _build() if x.shape[0] <= NATIVE_MAX_SLOTS else None
    if fn is None:
        return None
    # a decode step's operands come as the kernel takes them: check before converting (a call costs microseconds)
    x, w13, w2 = (t if t.is_contiguous() else t.contiguous() for t in (x, w13, w2))
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    if offs.dtype != torch.int32 or not offs.is_contiguous():
        offs = offs.to(torch.int32).contiguous()
    M, D = x.shape
    E, I = w13.shape[0], w2.shape[-1]
    if offs.shape != (E,) or weights.shape != (M,):
        raise ValueError(f"expert_mlp_rows: offs must be [{E}] and weights [{M}]; got {tuple(offs.shape)}, "
                         f"{tuple(weights.shape)}")
    y = torch.empty(M, D, dtype=torch.float32)
    rc = fn(x.data_ptr(), offs.data_ptr(), weights.data_ptr(), w13.data_ptr(), w2.data_ptr(), y.data_ptr(),
            M, E, D, I, limit)
    if rc == -1:
        raise ValueError(f"expert_mlp_rows: expert offsets must ascend within [0, {M}]; got {offs.tolist()}")
    if rc:
        raise MemoryError("expert_mlp_rows: no memory for the kernel's work list")
    return y
