"""Sparse decode attention on the CPU in one native kernel: scores, the sink softmax and the weighted sum.

A decode step's attention gives each row its own keys (its window ring and its selected compressed entries,
gathered: `sparse_sink_attention`), and every head of a row reads the same keys (one KV head). The torch
formulation is two batched GEMMs of one-row matrices (q . k per row, then p . v) with the softmax between them:
~75 us per `bmm` at 32 rows x 4 heads x 136 keys x 128 on the 2-core CI host, three passes over the keys, the
logits written and read twice. This kernel reads each row's keys once per pass (scores, then the weighted sum)
for a tile of up to 4 heads at once, keeps the logits in a row-local buffer, and takes the softmax in between:
OpenMP over (row, tile of heads). Keys with zero probability (masked: bias -inf) are skipped in the weighted sum.
The kernel's result for a row does not depend on the other rows of the batch.

It applies to fp32 operands on the CPU with the head dimension a multiple of 16, from 2 rows (`native_applies`,
`NATIVE_MIN_ROWS`); elsewhere, or where it cannot be built (kernels/native_cpu.py), `sparse_sink_attention_ref`
(kernels/attention.py) runs, its reference (tests/test_kernels.py). `torch.ops.v4ray.sparse_sink_attention` is an
operator of its own (registered as `kernels/paged_cpu.py`'s), so a compiled decode step calls it as one opaque call
(docs/architecture.md §12).
"""

from __future__ import annotations

import ctypes

import torch

from . import native_cpu

SIMD = 16       # fp32 lanes of the kernel's vectors: the head dimension is a multiple
# rows from which the kernel is used. One row is one work item per 4 heads (one thread for v4-tiny's 4), and a
# compiled step calls the operator through Python (~25 us): at batch 1 the torch formulation in the graph was faster
# (1.55 against 1.67 ms a step at 1K tokens, 2.10 against 2.28 ms at 32K; two engines alternated in one process),
# at 8 rows even, at 32 rows the kernel 0.1-0.25 ms faster. A traced step's row count is 1 or symbolic (>= 2), so
# the check adds no guard.
NATIVE_MIN_ROWS = 2

_SOURCE = native_cpu.SIMD_PRELUDE + r"""
#define HT 4        /* heads per tile */
#define KT 4        /* keys per tile of the scores */
#define DC 4        /* vectors of the head dimension per chunk of the weighted sum */
/* exp of 16 lanes (Cephes' expf: 2^n times a degree-7 polynomial, ~1 ulp); lanes below -87 (masked keys: -inf)
   give exactly 0, as expf would (it underflows there) */
static inline v16 vexp(v16 x) {
    typedef int32_t i16 __attribute__((vector_size(64)));
    const v16 lo = x < -87.f ? (v16){0} - 1.f : (v16){0};          /* -1 where the result is 0 (a lane mask) */
    x = x < -87.f ? (v16){0} - 87.f : x;
    x = x > 88.f ? (v16){0} + 88.f : x;
    const v16 magic = (v16){0} + 12582912.f;                        /* 1.5 * 2^23: round to nearest */
    v16 n = (x * 1.44269504088896341f + magic) - magic;
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
             + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.f;
    i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
    v16 scale; memcpy(&scale, &e, sizeof scale);
    y = y * scale;
    return lo < 0.f ? (v16){0} : y;
}
/* out[r, h] = sum_k p[h, k] kv[r, k], p[h] = softmax([q[r, h] . kv[r, k] * scale + bias[r, k] for k], sinks[h])
   without the sink's column, for rows r < n and heads h < H; d a multiple of 16. Returns 0, or -1 where a row's
   logits buffer could not be allocated. */
extern "C" int64_t sparse_sink_attention(const float* q, const float* kv, const float* bias, const float* sinks,
                                         float* out, int64_t n, int64_t H, int64_t K, int64_t d, float scale) {
    const int64_t tiles = (H + HT - 1) / HT;
    int64_t failed = 0;
    #pragma omp parallel for collapse(2) schedule(static) reduction(+:failed)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t h0 = t * HT, nh = H - h0 < HT ? H - h0 : HT;
            const float* keys = kv + r * K * d;
            const float* b = bias + r * K;
            const float* qr = q + (r * H + h0) * d;
            const int64_t Kp = (K + 15) / 16 * 16;                      /* logits padded to whole vectors */
            float* p = (float*)malloc(sizeof(float) * HT * (Kp > 0 ? Kp : 16));
            if (!p) { failed += 1; continue; }
            /* scores: KT keys x HT heads per pass over d */
            for (int64_t k = 0; k < K; k += KT) {
                const int nk = K - k < KT ? (int)(K - k) : KT;
                v16 a[HT][KT];
                for (int h = 0; h < HT; h++) for (int j = 0; j < KT; j++) a[h][j] = (v16){0};
                for (int64_t c = 0; c < d; c += 16) {
                    v16 kk[KT];
                    for (int j = 0; j < KT; j++) kk[j] = j < nk ? ld(keys + (k + j) * d + c) : (v16){0};
                    for (int h = 0; h < HT; h++) {
                        if (h >= nh) break;
                        const v16 qq = ld(qr + h * d + c);
                        for (int j = 0; j < KT; j++) a[h][j] += qq * kk[j];
                    }
                }
                for (int h = 0; h < nh; h++)
                    for (int j = 0; j < nk; j++) p[h * Kp + k + j] = hsum(a[h][j]) * scale + b[k + j];
            }
            /* the sink softmax, each head's probabilities in place (the padding's are 0) */
            for (int h = 0; h < nh; h++) {
                float* ph = p + h * Kp;
                for (int64_t j = K; j < Kp; j++) ph[j] = -INFINITY;
                const float sink = sinks[h0 + h];
                v16 mv = (v16){0} + sink;
                for (int64_t j = 0; j < Kp; j += 16) { v16 v = ld(ph + j); mv = v > mv ? v : mv; }
                float m = mv[0];
                for (int l = 1; l < 16; l++) m = mv[l] > m ? mv[l] : m;
                v16 sv = (v16){0};
                for (int64_t j = 0; j < Kp; j += 16) { v16 e = vexp(ld(ph + j) - m); st(ph + j, e); sv += e; }
                const float s = hsum(sv) + expf(sink - m);
                for (int64_t j = 0; j < Kp; j += 16) st(ph + j, ld(ph + j) / s);
            }
            /* the weighted sum, DC vectors of d at a time, zero-probability keys skipped */
            for (int64_t c = 0; c < d; c += 16 * DC) {
                const int nc = (d - c) / 16 < DC ? (int)((d - c) / 16) : DC;
                v16 o[HT][DC];
                for (int h = 0; h < HT; h++) for (int v = 0; v < DC; v++) o[h][v] = (v16){0};
                for (int64_t j = 0; j < K; j++) {
                    const float* kj = keys + j * d + c;
                    v16 kk[DC];
                    for (int v = 0; v < DC; v++) kk[v] = v < nc ? ld(kj + 16 * v) : (v16){0};
                    for (int h = 0; h < nh; h++) {
                        const float w = p[h * Kp + j];
                        if (w == 0.f) continue;
                        for (int v = 0; v < DC; v++) o[h][v] += w * kk[v];
                    }
                }
                for (int h = 0; h < nh; h++)
                    for (int v = 0; v < nc; v++) st(out + (r * H + h0 + h) * d + c + 16 * v, o[h][v]);
            }
            free(p);
        }
    }
    return failed ? -1 : 0;
}
"""


def _build():
    """The kernel built for this machine (kernels/native_cpu.py), or None where it cannot be built."""
    return native_cpu.load("sparse_sink_attention", _SOURCE, ctypes.c_int64,
                           [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_float])


def native_applies(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether the kernel takes operands of these dtypes, devices and sizes (and is used for this many rows)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, kv))
            and q.shape[-1] % SIMD == 0 and q.shape[0] >= NATIVE_MIN_ROWS)


def sparse_sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                          scale: float) -> torch.Tensor | None:
    """The kernel on operands `native_applies` accepted: q [n, H, d], kv [n, K, d], bias [n, K], sinks [H] ->
    [n, H, d] fp32; None where it could not be built."""
    fn = _build()
    if fn is None:
        return None
    # a decode step's operands come as the kernel takes them: check before converting (a call costs microseconds)
    q, kv = (t if t.is_contiguous() else t.contiguous() for t in (q, kv))
    bias, sinks = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
                   for t in (bias, sinks))
    n, H, d = q.shape
    out = torch.empty(n, H, d, dtype=torch.float32)
    if fn(q.data_ptr(), kv.data_ptr(), bias.data_ptr(), sinks.data_ptr(), out.data_ptr(), n, H, kv.shape[1], d,
          scale):
        raise MemoryError("sparse_sink_attention: no memory for a row's logits")
    return out
