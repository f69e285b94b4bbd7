"""Triton kernels against their torch references (CPU, Triton's interpreter) and the backend switch.

`@triton.jit` decides between compiled and interpreted kernels when the kernel files are imported, and other test
modules import `v4ray.kernels` during collection, so setting TRITON_INTERPRET here would come too late. The kernel
comparisons therefore live in `kernel_checks.py`, run in fresh processes with TRITON_INTERPRET=1 and
V4RAY_KERNELS=triton (the kernel families and the whole-model check run side by side, one per core); this module
asserts on their per-family reports. The backend selection and the wrappers' input checks run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from v4ray.kernels import backend
from v4ray.kernels import kv_fp8
from v4ray.kernels.attention import (banded_sink_attention, sink_attention_ref, sparse_sink_attention_fp8_triton,
                                     sparse_sink_attention_triton)
from v4ray.kernels.backend import ENV_KERNELS, kernel_backend, triton_calls
from v4ray.kernels.compressor import compress_pool
from v4ray.kernels.indexer import indexer_topk_padded_fp8_triton, stable_topk
from v4ray.kernels.moe import expert_mlp_triton
from v4ray.kernels.quant import QuantTensor, quant_fp8
from v4ray.model import kv_format

CHECKS = Path(__file__).with_name("kernel_checks.py")
KERNEL_FAMILIES = ["moe", "attention", "indexer", "compressor", "mhc"]  # attention, indexer: FP8 cache paths too
CHECKS_TIMEOUT_S = 270


@pytest.fixture(scope="module")
def kernel_reports() -> dict[str, dict]:
    """Run kernel_checks.py (kernel families | model) in two interpreter processes; family -> report."""
    env = {**os.environ, "TRITON_INTERPRET": "1", ENV_KERNELS: "triton", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(CHECKS), *group], cwd=CHECKS.parents[1], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group in (KERNEL_FAMILIES, ["model"])]
    reports: dict[str, dict] = {}
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=CHECKS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in out.splitlines():
            if line.startswith("KERNEL_CHECK "):
                rep = json.loads(line[len("KERNEL_CHECK "):])
                reports[rep["family"]] = {**rep, "stderr": err[-4000:]}
        reports.setdefault("_stderr", {})[proc.args[2]] = err[-4000:]
    return reports


@pytest.mark.parametrize("family", KERNEL_FAMILIES + ["model"])
def test_triton_matches_reference(kernel_reports, family):
    rep = kernel_reports.get(family)
    assert rep is not None, f"kernel_checks.py reported nothing for {family}:\n{kernel_reports['_stderr']}"
    assert rep["status"] == "ok", f"{family}: {rep['error']}\n{rep['stderr']}"
    assert rep["cases"], f"{family}: no cases ran"
    worst = max(rep["cases"], key=lambda c: c["max_rel"])
    print(f"{family}: {len(rep['cases'])} cases in {rep['seconds']} s, worst {worst['case']} "
          f"max_rel {worst['max_rel']:.2e} max_abs {worst['max_abs']:.2e}")


# ---- backend selection ----------------------------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_KERNELS, raising=False)
    assert kernel_backend(cpu) == "torch"                        # auto: torch on CPU
    assert kernel_backend(torch.device("cuda", 0)) == "triton"   # auto: Triton on CUDA (no GPU needed to decide)
    monkeypatch.setenv(ENV_KERNELS, "torch")
    assert kernel_backend(torch.device("cuda", 0)) == "torch"
    monkeypatch.setenv(ENV_KERNELS, "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernel_backend(cpu)
    monkeypatch.setenv(ENV_KERNELS, "triton")
    monkeypatch.setattr(backend, "_INTERPRETED_AT_IMPORT", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_backend(cpu)
    monkeypatch.setattr(backend, "_INTERPRETED_AT_IMPORT", True)
    assert kernel_backend(cpu) == "triton"


def test_default_cpu_dispatch_stays_on_torch(monkeypatch):
    monkeypatch.delenv(ENV_KERNELS, raising=False)
    before = dict(triton_calls)
    compress_pool(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    assert dict(triton_calls) == before


# ---- wrapper input checks (they run before any launch) -----------------------------------------------------------------

def test_wrappers_reject_bad_inputs():
    D, I = 64, 32
    plain = tuple(QuantTensor(torch.randn(*s)) for s in ((I, D), (D, I), (I, D)))
    fp8 = tuple(QuantTensor(*quant_fp8(torch.randn(*s)), fmt="fp8") for s in ((I, D), (D, I), (I, D)))
    x, idx, w = torch.randn(3, D), torch.tensor([0, 1, 0]), torch.rand(3)
    with pytest.raises(ValueError, match="one format per call"):
        expert_mlp_triton(x, idx, w, {0: plain, 1: fp8}, 10.0)
    with pytest.raises(ValueError, match=r"w1 is \[32, 64\], expected \[32, 128\]"):
        expert_mlp_triton(torch.randn(3, 2 * D), idx, w, {0: plain}, 10.0)
    q, kv = torch.randn(2, 4, 16), torch.randn(2, 5, 16).double()
    with pytest.raises(ValueError, match="kv must be fp32/bf16/fp16"):
        sparse_sink_attention_triton(q, kv, torch.zeros(2, 5), torch.zeros(4), 0.25)
    with pytest.raises(ValueError, match="must be contiguous"):
        kv_t = torch.randn(2, 16, 5).transpose(1, 2)
        sparse_sink_attention_triton(q, kv_t, torch.zeros(2, 5), torch.zeros(4), 0.25)
    bias = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"packed keys must be uint8 \[n, K, 136\]"):
        sparse_sink_attention_fp8_triton(torch.randn(2, 4, 96), torch.zeros(2, 5, 160, dtype=torch.uint8), bias,
                                         torch.zeros(4), 0.1, 96, 32)
    with pytest.raises(ValueError, match=r"packed keys must be uint8 \[n, E, 20\]"):
        indexer_topk_padded_fp8_triton(torch.randn(2, 4, 16), torch.zeros(2, 5, 16), torch.randn(2, 4),
                                       torch.ones(2, 5, dtype=torch.bool), 3)


# ---- the FP8 cache layout the kernels read ------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,rope_dim", [(512, 64), (96, 32), (128, 64)])
def test_kernel_fp8_unpack_matches_the_cache_format(head_dim, rope_dim):
    """kernels/kv_fp8.py restates model/kv_format.py's byte layout (kernels cannot import the model): same entry
    sizes, and unpacking the cache's own packed bytes gives bit-identical values."""
    g = torch.Generator().manual_seed(7)
    assert kv_fp8.main_entry_bytes(head_dim, rope_dim) == kv_format.main_entry_bytes(head_dim, rope_dim, "fp8")
    assert kv_fp8.index_entry_bytes(head_dim) == kv_format.index_key_bytes(head_dim, "fp8")
    blocks = -(-head_dim // 64)
    gain = torch.exp2(torch.randint(-20, 12, (40, blocks), generator=g).float()).repeat_interleave(64, 1)
    x = torch.randn(40, head_dim, generator=g) * gain[:, :head_dim]
    x[0] = 0                                                       # an all-zero entry: the smallest scale byte
    x[1, : head_dim - rope_dim] = 448 * 2.0 ** 10                  # saturating magnitudes
    packed = kv_format.pack_main(x, rope_dim)
    for dtype in (torch.float32, torch.bfloat16):
        ours = kv_fp8.unpack_main_ref(packed.view(4, 10, -1), head_dim, rope_dim, dtype).view(40, head_dim)
        assert torch.equal(ours, kv_format.unpack_main(packed, head_dim, rope_dim, dtype))
    packed_index = kv_format.pack_index(x)
    assert torch.equal(kv_fp8.unpack_index_ref(packed_index, torch.float32),
                       kv_format.unpack_index(packed_index, torch.float32))


@pytest.mark.parametrize("E,k", [(7, 7), (300, 16), (8256, 16)])
def test_stable_topk_picks_what_a_stable_sort_picks(E, k):
    """The indexer's top-k (an int64-keyed partial selection) equals a stable descending sort's first k columns:
    ties (repeated values, both zeros, -inf padding) go to the earliest column."""
    g = torch.Generator().manual_seed(E)
    scores = torch.randn(6, E, generator=g)
    scores[0] = torch.randint(-2, 3, (E,), generator=g).float()            # many ties
    scores[1, E // 2:] = float("-inf")                                      # padding
    scores[2] = 0.0
    scores[2, ::3] = -0.0                                                   # signed zeros tie
    scores[3] = float("-inf")
    scores[4] = scores[4].abs() * -1e-30                                    # tiny negatives and subnormals
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(stable_topk(scores, k), want)
    # the check can fail: the plain top-k breaks the ties in row 0 otherwise
    assert not torch.equal(scores.topk(k, dim=-1).indices[:3], want[:3]) or E == k


# fp32 both sides: the same logits and softmax, summed in another order (blocks of 2w-1 window keys, the output as
# two products); observed <= 5e-7 at these sizes
BANDED_ATOL = 2e-6


@pytest.mark.parametrize("w,n,cached,E", [(16, 128, 0, 32), (16, 128, 15, 8), (16, 100, 7, 0), (8, 50, 3, 5)])
def test_banded_sink_attention_is_the_dense_window(w, n, cached, E):
    """A chunk of n queries after `cached` window rows, its window as a band, against `sink_attention_ref` over the
    same keys with the window's dense bias: n not a multiple of w, a partly filled ring, no entries."""
    g = torch.Generator().manual_seed(n + cached)
    H, d = 4, 32
    q, keys = torch.randn(n, H, d, generator=g), torch.randn(cached + n, d, generator=g)
    entries, sinks = torch.randn(E, d, generator=g), torch.randn(H, generator=g)
    rel = torch.arange(-cached, n)[None, :] - torch.arange(n)[:, None]
    window_bias = torch.zeros(n, cached + n).masked_fill((rel > 0) | (rel <= -w), float("-inf"))
    entry_bias = torch.zeros(n, E).masked_fill(torch.rand(n, E, generator=g) < 0.5, float("-inf"))
    ref = sink_attention_ref(q, torch.cat([keys, entries]), torch.cat([window_bias, entry_bias], 1), sinks, d ** -0.5)
    pad = w - 1 - cached  # rows before the sequence's start: any value, never seen
    window_keys = torch.cat([torch.full((pad, d), 1e4), keys])
    out = banded_sink_attention(q, window_keys, torch.tensor([pad]), entries, entry_bias, sinks, d ** -0.5, w)
    assert (out - ref).abs().max() <= BANDED_ATOL


# ---- the CPU decode's paged indexer scores (kernels/paged_cpu.py) ---------------------------------------------------

# fp32 both sides: the same dot products of dI terms, ReLU, head weights and head sum, in another order (the kernel's
# SIMD lanes over heads against a GEMM); relative to the largest score, observed <= 3e-7 at these sizes
PAGED_SCORE_RTOL = 2e-6


@pytest.mark.parametrize("n,W,blocks,E,H,D", [(1, 130, 131, 64, 16, 64),   # v4-tiny at 32K tokens, batch 1
                                              (5, 3, 12, 64, 16, 64),      # a batch, tables sharing blocks
                                              (2, 4, 9, 12, 64, 128),      # V4's 64 heads x 128; E not a multiple of 8
                                              (3, 2, 5, 5, 32, 40)])       # only a tail of entries
def test_paged_index_scores_read_in_place_equal_the_gathered_keys(n, W, blocks, E, H, D):
    """The native kernel reads each table block of the key pool where it lives: its scores equal the torch
    formulation's over the gathered copy (the decode step's former path), and its top-k with a row's fresh entry
    substituted picks what `indexer_topk_padded_ref` picks over the gathered keys with that entry in place."""
    from v4ray.kernels import paged_cpu
    from v4ray.kernels.indexer import indexer_topk_padded_ref, indexer_topk_paged

    assert paged_cpu._build() is not None, "the paged kernel did not build here (a C++ compiler is needed: g++)"
    g = torch.Generator().manual_seed(n * W + E)
    pool, tables = torch.randn(blocks, E, D, generator=g), torch.randint(0, blocks, (n, W), generator=g)
    q, w = torch.randn(n, H, D, generator=g), torch.randn(n, H, generator=g) * H ** -0.5
    assert paged_cpu.native_applies(q, pool)
    got, want = paged_cpu.paged_index_scores(q, pool, tables, w), paged_cpu.paged_index_scores_ref(q, pool, tables, w)
    assert got.shape == (n, W * E)
    assert (got - want).abs().max() <= PAGED_SCORE_RTOL * want.abs().max()
    # top-k: a fresh entry per row (row 0 none), a valid prefix per row
    valid = torch.arange(W * E)[None, :] < torch.randint(1, W * E + 1, (n, 1), generator=g)
    fresh_index = torch.randint(0, W * E, (n,), generator=g)
    fresh_index[0] = -1
    fresh_key = torch.randn(n, D, generator=g)
    gathered = pool[tables].flatten(1, 2).clone()
    rows = torch.arange(1, n)
    gathered[rows, fresh_index[1:]] = fresh_key[1:]
    k = min(16, W * E)
    assert torch.equal(indexer_topk_paged(q, pool, tables, w, valid, 16, fresh_index, fresh_key),
                       indexer_topk_padded_ref(q, gathered, w, valid, k))
    # an FP8 cache's packed keys (the torch reference unpacks the gathered blocks; Triton reads them in place)
    packed, fresh_packed = kv_format.pack_index(pool.flatten(0, 1)).view(blocks, E, -1), kv_format.pack_index(fresh_key)
    gathered = kv_fp8.unpack_index_ref(packed[tables].flatten(1, 2), torch.float32).clone()
    gathered[rows, fresh_index[1:]] = kv_fp8.unpack_index_ref(fresh_packed, torch.float32)[1:]
    assert torch.equal(indexer_topk_paged(q, packed, tables, w, valid, 16, fresh_index, fresh_packed),
                       indexer_topk_padded_ref(q, gathered, w, valid, k))


def test_paged_index_scores_outside_the_kernel_and_out_of_range():
    """Operands the kernel does not take (4 heads: not a multiple of 16; bf16 keys) get the torch formulation; a
    table entry outside the pool is an IndexError, not a read of foreign memory."""
    from v4ray.kernels import paged_cpu

    g = torch.Generator().manual_seed(7)
    pool, tables = torch.randn(6, 8, 32, generator=g), torch.randint(0, 6, (2, 3), generator=g)
    q, w = torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, generator=g)
    assert not paged_cpu.native_applies(q, pool)
    assert torch.equal(paged_cpu.paged_index_scores(q, pool, tables, w),
                       paged_cpu.paged_index_scores_ref(q, pool, tables, w))
    q16, w16 = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, generator=g)
    assert not paged_cpu.native_applies(q16, pool.bfloat16())
    assert paged_cpu.paged_index_scores(q16, pool.bfloat16(), tables, w16).dtype == torch.float32
    with pytest.raises(IndexError, match="outside the pool's 6 blocks"):
        paged_cpu.paged_index_scores(q16, pool, torch.full((2, 3), 6), w16)
    with pytest.raises(IndexError, match="outside the pool"):
        paged_cpu.paged_index_scores(q16, pool, torch.full((2, 3), -1), w16)


def _sink_attention_f64(q, kv, bias, sinks, scale):
    """`sparse_sink_attention_ref`'s formula in float64: the yardstick for both fp32 forms."""
    q, kv, bias, sinks = (t.double() for t in (q, kv, bias, sinks))
    logits = torch.einsum("nhd,nkd->nhk", q, kv) * scale + bias[:, None, :]
    m = torch.maximum(logits.amax(-1, keepdim=True), sinks[:, None])
    p = torch.exp(logits - m)
    return torch.einsum("nhk,nkd->nhd", p / (p.sum(-1, keepdim=True) + torch.exp(sinks[:, None] - m)), kv)


@pytest.mark.parametrize("n,H,K,d,qscale", [(32, 4, 136, 128, 1.0),    # v4-tiny's decode step at 32 rows
                                            (2, 4, 200, 128, 3.0),     # sharper softmax
                                            (2, 64, 640, 512, 1.0),    # V4-Flash's heads x head_dim
                                            (3, 6, 37, 32, 10.0),      # head and key tails, near one-hot
                                            (2, 3, 1, 16, 1.0)])       # a single key
def test_sparse_sink_attention_native_kernel_is_as_accurate_as_torch(n, H, K, d, qscale):
    """The CPU's native decode attention (kernels/attention_cpu.py) against the same formula in float64: no further
    from it than torch's fp32 formulation (its reference) is, within a factor of 2 (the two sum in different
    orders and the kernel's exp is a polynomial: observed 0.5-1.3x torch's own error). Masked keys (bias -inf)
    have no weight; the same check fails for a mask shifted by one key."""
    from v4ray.kernels import attention_cpu
    from v4ray.kernels.attention import sparse_sink_attention, sparse_sink_attention_ref

    assert attention_cpu._build() is not None, "the attention kernel did not build here (a C++ compiler is needed)"
    g = torch.Generator().manual_seed(n * K + H)
    q, kv = torch.randn(n, H, d, generator=g) * qscale, torch.randn(n, K, d, generator=g)
    bias, sinks, scale = torch.zeros(n, K), torch.randn(H, generator=g), d ** -0.5
    bias[:, K // 3:K // 2] = float("-inf")
    assert attention_cpu.native_applies(q, kv)
    exact = _sink_attention_f64(q, kv, bias, sinks, scale)
    got, ref = sparse_sink_attention(q, kv, bias, sinks, scale), sparse_sink_attention_ref(q, kv, bias, sinks, scale)
    assert got.shape == (n, H, d) and got.dtype == torch.float32
    torch_err = (ref.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 2 * torch_err + 1e-7 * exact.abs().max()
    if K > 3:
        shifted = bias.roll(1, dims=1)
        assert (_sink_attention_f64(q, kv, shifted, sinks, scale) - got.double()).abs().max() > 100 * torch_err


def test_sparse_sink_attention_native_kernel_rows_and_fallbacks():
    """The kernel's result for a row is the same bits alone as in a batch; a row whose keys are all masked attends to
    the sink alone (zeros); one row (`NATIVE_MIN_ROWS`), bf16 operands and a head dimension that is not a multiple of
    16 take the torch reference; with the native kernels switched off the operator runs it too."""
    from v4ray.kernels import attention_cpu, native_cpu
    from v4ray.kernels.attention import sparse_sink_attention, sparse_sink_attention_ref

    g = torch.Generator().manual_seed(3)
    q, kv, sinks = torch.randn(9, 4, 64, generator=g), torch.randn(9, 50, 64, generator=g), torch.randn(4, generator=g)
    bias = torch.zeros(9, 50)
    bias[4] = float("-inf")
    batch = sparse_sink_attention(q, kv, bias, sinks, 0.125)
    for r in (0, 4, 8):
        one = (q[r:r + 1], kv[r:r + 1], bias[r:r + 1], sinks, 0.125)
        assert torch.equal(attention_cpu.sparse_sink_attention(*one), batch[r:r + 1])
    assert torch.equal(batch[4], torch.zeros(4, 64))
    for args in ((q[:1], kv[:1]), (q.bfloat16(), kv.bfloat16()), (q[..., :40], kv[..., :40])):
        rows = bias[:args[0].shape[0]]
        assert not attention_cpu.native_applies(*args)
        assert torch.equal(sparse_sink_attention(*args, rows, sinks, 0.125),
                           sparse_sink_attention_ref(*args, rows, sinks, 0.125))
    native_cpu.ENABLED = False
    try:
        assert torch.equal(sparse_sink_attention(q, kv, bias, sinks, 0.125),
                           sparse_sink_attention_ref(q, kv, bias, sinks, 0.125))
    finally:
        native_cpu.ENABLED = True
