"""Triton kernels against their torch references, on CPU under Triton's interpreter.

A program, not a pytest module: `@triton.jit` picks interpreted vs. compiled functions when the kernel files are
imported, and by the time pytest collects this directory other test modules have imported `v4ray.kernels` (and
torch may have imported triton). So `tests/test_kernels.py` runs this file in a fresh process with
TRITON_INTERPRET=1 and V4RAY_KERNELS=triton set before anything imports triton.

    TRITON_INTERPRET=1 V4RAY_KERNELS=triton python tests/kernel_checks.py [moe attention indexer compressor mhc model]

Every case calls the public dispatch function (so the backend choice is exercised too), compares it with the
`*_ref` function beside the kernel, checks that the Triton counter moved (no silent torch fallback) and prints one
`KERNEL_CHECK {json}` line with the errors it saw. Shapes: regular, ragged (not multiples of any block) and one
real per-program tile (head_dim 512, 128-wide blocks, several programs) per kernel.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("kernel_checks.py needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
os.environ["V4RAY_KERNELS"] = "triton"   # the dispatch functions must take the Triton path on CPU tensors

import torch  # noqa: E402

from v4ray.kernels import (compress_pool, expert_mlp, indexer_topk, indexer_topk_padded,  # noqa: E402
                           indexer_topk_padded_fp8, indexer_topk_paged, mhc_weights, sink_attention,
                           sparse_sink_attention, sparse_sink_attention_fp8)
from v4ray.kernels.attention import (sink_attention_ref, sparse_sink_attention_fp8_ref,  # noqa: E402
                                     sparse_sink_attention_ref)
from v4ray.kernels.backend import ENV_KERNELS, triton_calls  # noqa: E402
from v4ray.kernels.compressor import compress_pool_ref  # noqa: E402
from v4ray.kernels.indexer import (_launch_indexer_scores, indexer_topk_padded_fp8_ref,  # noqa: E402
                                   indexer_topk_padded_ref, indexer_topk_ref)
from v4ray.kernels.mhc import mhc_weights_ref  # noqa: E402
from v4ray.kernels.kv_fp8 import unpack_index_ref  # noqa: E402
from v4ray.kernels.moe import expert_mlp_ref  # noqa: E402
from v4ray.kernels.quant import QuantTensor, quant_fp4, quant_fp8  # noqa: E402
from v4ray.model.kv_format import pack_index, pack_main  # noqa: E402  (the cache's own packing)
from v4ray.model.config import CSA  # noqa: E402

# Named tolerances: max|out - ref| / max|ref| and cosine similarity (over the flattened outputs, float64).
FP32_REL = 1e-5        # same math in fp32, different summation order
FP32_COS_MIN = 1 - 1e-7
BF16_REL = 2e-2        # bf16 outputs: the interpreter truncates on the final cast (1 ulp = 2^-8 relative)
BF16_COS_MIN = 0.9995
MODEL_FP32_REL = 1e-4  # whole-model logits, triton vs torch path, per position max|diff| / max|ref|

RESULTS: list[dict] = []


def _compare(family: str, case: str, out: torch.Tensor, ref: torch.Tensor, rel: float, cos_min: float,
             **extra) -> None:
    out64, ref64 = out.double().flatten(), ref.double().flatten()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out64), finite), f"{family}/{case}: non-finite entries differ"
    o, r = out64[finite], ref64[finite]
    max_abs = float((o - r).abs().max()) if r.numel() else 0.0
    scale = float(r.abs().max()) if r.numel() else 1.0
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0)) if r.numel() and scale > 0 else 1.0
    rec = {"family": family, "case": case, "max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-30), "cos": cos,
           **extra}
    RESULTS.append(rec)
    assert rec["max_rel"] <= rel, f"{family}/{case}: max_rel {rec['max_rel']:.3g} > {rel}"
    assert cos >= cos_min, f"{family}/{case}: cosine {cos:.9f} < {cos_min}"


class ran_triton:
    """Asserts the named Triton wrapper launched inside the block."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.before = triton_calls[self.name]

    def __exit__(self, *exc):
        if exc[0] is None:
            assert triton_calls[self.name] > self.before, f"{self.name}: the Triton path did not run"


def _tols(dtype: torch.dtype) -> tuple[float, float]:
    return (FP32_REL, FP32_COS_MIN) if dtype == torch.float32 else (BF16_REL, BF16_COS_MIN)


# ---- grouped expert GEMM -----------------------------------------------------------------------------------------

def _experts(D: int, I: int, ids: list[int], fmt: str | None, dtype: torch.dtype, g: torch.Generator):
    out = {}
    for e in ids:
        ws = [torch.randn(I, D, generator=g) / D ** 0.5, torch.randn(D, I, generator=g) / I ** 0.5,
              torch.randn(I, D, generator=g) / D ** 0.5]
        if fmt == "fp8":
            out[e] = tuple(QuantTensor(*quant_fp8(w), fmt="fp8") for w in ws)
        elif fmt == "fp4":
            out[e] = tuple(QuantTensor(*quant_fp4(w), fmt="fp4") for w in ws)
        else:
            out[e] = tuple(QuantTensor(w.to(dtype)) for w in ws)
    return out


def check_moe():
    g = torch.Generator().manual_seed(0)
    # (case, M rows, D hidden, I intermediate, expert ids, format, dtype)
    cases = [("regular", 32, 64, 128, [0, 1], None, torch.float32),
             ("ragged", 37, 160, 96, [2, 5, 7, 11], None, torch.float32),   # expert 11 gets no rows
             ("ragged-fp8", 37, 160, 96, [2, 5, 7, 11], "fp8", torch.float32),
             ("ragged-fp4", 37, 160, 96, [2, 5, 7, 11], "fp4", torch.float32),
             ("ragged-bf16", 37, 160, 96, [2, 5, 7], None, torch.bfloat16),
             ("real-tile", 40, 512, 256, [3, 4], None, torch.float32),
             ("real-tile-fp8", 40, 512, 256, [3, 4], "fp8", torch.float32),
             ("real-tile-fp4", 24, 512, 256, [3, 4], "fp4", torch.float32)]
    for case, M, D, I, ids, fmt, dtype in cases:
        experts = _experts(D, I, ids, fmt, dtype, g)
        x = (torch.randn(M, D, generator=g) * 2).to(dtype)
        used = ids[:3] if len(ids) > 3 else ids
        idx = torch.tensor(used)[torch.randint(0, len(used), (M,), generator=g)]
        weights = torch.rand(M, generator=g)
        limit = 0.75  # small, so both the min() on gate and the clamp on up bind
        with ran_triton("expert_mlp"):
            out = expert_mlp(x, idx, weights, experts, limit)
        ref = expert_mlp_ref(x, idx, weights, experts, limit)
        _compare("moe", case, out, ref, *_tols(dtype), shape=[M, D, I, len(ids)], fmt=fmt or "plain")


# ---- attention ------------------------------------------------------------------------------------------------------

def check_attention():
    g = torch.Generator().manual_seed(1)
    # (case, n rows, H heads, K keys, d, dtype)
    cases = [("regular", 4, 16, 64, 64, torch.float32),
             ("ragged", 3, 20, 77, 96, torch.float32),
             ("ragged-bf16", 3, 20, 77, 96, torch.bfloat16),
             ("real-tile", 2, 64, 200, 512, torch.float32)]
    for case, n, H, K, d, dtype in cases:
        q = torch.randn(n, H, d, generator=g).to(dtype)
        kv = torch.randn(n, K, d, generator=g).to(dtype)
        sinks = torch.randn(H, generator=g) * 2
        bias = torch.zeros(n, K).masked_fill(torch.rand(n, K, generator=g) < 0.4, float("-inf"))
        bias[0, K // 2:] = float("-inf")        # whole key blocks masked: skipped by the kernel
        if n > 2:
            bias[2] = float("-inf")             # a row with no visible key: only the sink -> zeros
        with ran_triton("sparse_sink_attention"):
            out = sparse_sink_attention(q, kv, bias, sinks, d ** -0.5)
        ref = sparse_sink_attention_ref(q, kv, bias, sinks, d ** -0.5)
        _compare("attention", f"sparse-{case}", out, ref, *_tols(dtype), shape=[n, H, K, d])
    # FP8 cache entries read in place (packed by the cache's own pack_main; dequantized in registers)
    # (case, n, H, K, head_dim, rope_dim, q dtype); head_dim 96 / rope 32: a partial block and a ragged d tile
    for case, n, H, K, d, rope, dtype in [("ragged", 3, 20, 77, 96, 32, torch.float32),
                                          ("ragged-bf16", 3, 20, 77, 96, 32, torch.bfloat16),
                                          ("real-tile", 2, 64, 200, 512, 64, torch.float32)]:
        q = torch.randn(n, H, d, generator=g).to(dtype)
        # entries and 64-dim blocks of many magnitudes, so the ue8m0 scale bytes differ per block
        block_gain = torch.exp2(torch.randint(-6, 4, (n * K, -(-d // 64)), generator=g).float())
        kv = torch.randn(n * K, d, generator=g) * block_gain.repeat_interleave(64, 1)[:, :d] * 0.25
        packed = pack_main(kv, rope).view(n, K, -1)
        sinks = torch.randn(H, generator=g) * 2
        bias = torch.zeros(n, K).masked_fill(torch.rand(n, K, generator=g) < 0.4, float("-inf"))
        bias[0, K // 2:] = float("-inf")
        with ran_triton("sparse_sink_attention_fp8"):
            out = sparse_sink_attention_fp8(q, packed, bias, sinks, d ** -0.5, d, rope)
        ref = sparse_sink_attention_fp8_ref(q, packed, bias, sinks, d ** -0.5, d, rope)
        _compare("attention", f"sparse-fp8-{case}", out, ref, *_tols(dtype), shape=[n, H, K, d])
    # prefill form: shared keys, causal + window bias
    for case, T, H, S, d in [("regular", 16, 16, 32, 64), ("ragged", 13, 20, 45, 96), ("real-tile", 6, 32, 160, 512)]:
        q = torch.randn(T, H, d, generator=g)
        kv = torch.randn(S, d, generator=g)
        sinks = torch.randn(H, generator=g)
        pos = torch.arange(T)[:, None] + (S - T)
        rel = torch.arange(S)[None, :] - pos
        bias = torch.zeros(T, S).masked_fill((rel > 0) | (rel <= -24), float("-inf"))
        with ran_triton("sink_attention"):
            out = sink_attention(q, kv, bias, sinks, d ** -0.5)
        ref = sink_attention_ref(q, kv, bias, sinks, d ** -0.5)
        _compare("attention", f"prefill-{case}", out, ref, FP32_REL, FP32_COS_MIN, shape=[T, H, S, d])


# ---- indexer --------------------------------------------------------------------------------------------------------

def _index_scores(q, keys, weights):
    """The reference's scores, [T, C] (or [n, E] for per-row keys)."""
    eq = "thd,cd->thc" if keys.dim() == 2 else "nhd,ned->nhe"
    s = torch.einsum(eq, q.float(), keys.float()).relu() * (q.shape[-1] ** -0.5)
    return (s * weights.float()[..., None]).sum(dim=1)


def _compare_topk(case: str, top: torch.Tensor, ref_top: torch.Tensor, scores: torch.Tensor) -> None:
    """Same -1 slots; the selected entries' reference scores agree (equal indices unless two scores are within
    rounding of each other), and exact ties resolve to the same (lower) index."""
    assert torch.equal(top < 0, ref_top < 0), f"indexer/{case}: -1 slots differ"
    got = scores.gather(1, top.clamp(min=0)).masked_fill(top < 0, 0)
    want = scores.gather(1, ref_top.clamp(min=0)).masked_fill(ref_top < 0, 0)
    _compare("indexer", f"{case}-selected", got, want, FP32_REL, FP32_COS_MIN,
             index_mismatches=int((top != ref_top).sum()))
    differ = top != ref_top
    if differ.any():  # only near-ties may swap
        gap = (got - want).abs()[differ]
        assert float(gap.max()) <= FP32_REL * float(scores[torch.isfinite(scores)].abs().max()), \
            f"indexer/{case}: different entries selected"


def check_indexer():
    g = torch.Generator().manual_seed(2)
    # (case, T queries, h heads, dI, C entries, topk)
    cases = [("regular", 8, 16, 64, 64, 16), ("ragged", 9, 12, 48, 77, 10), ("real-tile", 4, 64, 128, 300, 64)]
    for case, T, h, dI, C, k in cases:
        q = torch.randn(T, h, dI, generator=g)
        keys = torch.randn(C, dI, generator=g)
        keys[: C // 4] = -keys[: C // 4].abs()           # with q >= 0 below: exact-zero scores, i.e. ties
        q[0] = q[0].abs()
        w = torch.randn(T, h, generator=g) * h ** -0.5
        hi = torch.randint(0, C + 1, (T,), generator=g)
        hi[0] = C
        lo = hi // 3
        lo[0] = 0
        with ran_triton("indexer_topk"):
            top = indexer_topk(q, keys, w, lo, hi, k)
        ref_top = indexer_topk_ref(q, keys, w, lo, hi, k)
        scores = _index_scores(q, keys, w)
        j = torch.arange(C)[None, :]
        scores = scores.masked_fill((j < lo[:, None]) | (j >= hi[:, None]), float("-inf"))
        _compare_topk(case, top, ref_top, scores)
        raw = _launch_indexer_scores(q, keys, 0, w, C, lo, hi, None, "indexer_topk")
        _compare("indexer", f"{case}-scores", raw, scores, FP32_REL, FP32_COS_MIN, shape=[T, h, dI, C])

        E = C // 2 + 3
        keys_p = torch.randn(T, E, dI, generator=g)
        keys_p[:, : E // 4] = -keys_p[:, : E // 4].abs()
        valid = torch.rand(T, E, generator=g) < 0.8
        valid[1, 3:] = False                              # fewer valid than topk: -1 tail
        with ran_triton("indexer_topk_padded"):
            top = indexer_topk_padded(q, keys_p, w, valid, k)
        ref_top = indexer_topk_padded_ref(q, keys_p, w, valid, k)
        scores = _index_scores(q, keys_p, w).masked_fill(~valid, float("-inf"))
        _compare_topk(f"padded-{case}", top, ref_top, scores)

        packed = pack_index(keys_p.flatten(0, 1) * torch.logspace(-2, 2, T * E)[:, None]).view(T, E, -1)
        with ran_triton("indexer_topk_padded_fp8"):
            top = indexer_topk_padded_fp8(q, packed, w, valid, k)
        ref_top = indexer_topk_padded_fp8_ref(q, packed, w, valid, k)
        keys_8 = unpack_index_ref(packed, torch.float32)
        scores = _index_scores(q, keys_8, w).masked_fill(~valid, float("-inf"))
        _compare_topk(f"padded-fp8-{case}", top, ref_top, scores)
        raw = _launch_indexer_scores(q, packed, packed.stride(0), w, E, None, None, valid, "indexer_topk_padded_fp8",
                                     keys_fp8=True)
        _compare("indexer", f"padded-fp8-{case}-scores", raw, scores, FP32_REL, FP32_COS_MIN, shape=[T, h, dI, E])

        # paged (the decode step): the candidates as blocks of 8 entries of a pool, read through each row's table,
        # with a row's fresh entry (not in the pool yet) scored from its key; fp32 keys, then FP8-packed ones
        Eb, W = 8, -(-E // 8)
        blocks = T * W + 3
        pool = torch.randn(blocks, Eb, dI, generator=g)
        pool[:, :2] = -pool[:, :2].abs()                  # exact-zero scores for q[0] >= 0: ties
        tables = torch.randperm(blocks, generator=g)[:T * W].view(T, W)
        valid_p = torch.rand(T, W * Eb, generator=g) < 0.8
        valid_p[1, 3:] = False
        fresh_index = torch.randint(0, W * Eb, (T,), generator=g)
        fresh_index[0] = -1
        fresh_key = torch.randn(T, dI, generator=g)
        rows = torch.arange(1, T)
        for fmt in ("fp32", "fp8"):
            if fmt == "fp8":
                pool = pack_index(pool.flatten(0, 1) * torch.logspace(-2, 2, blocks * Eb)[:, None]).view(blocks, Eb, -1)
                fresh_key = pack_index(fresh_key)
            as_fp32 = (lambda x: unpack_index_ref(x, torch.float32)) if fmt == "fp8" else (lambda x: x)
            gathered = as_fp32(pool[tables].flatten(1, 2)).clone()
            gathered[rows, fresh_index[1:]] = as_fp32(fresh_key)[1:]
            with ran_triton("indexer_topk_paged"):
                top = indexer_topk_paged(q, pool, tables, w, valid_p, k, fresh_index, fresh_key)
            ref_top = indexer_topk_padded_ref(q, gathered, w, valid_p, k)
            scores = _index_scores(q, gathered, w).masked_fill(~valid_p, float("-inf"))
            _compare_topk(f"paged-{fmt}-{case}", top, ref_top, scores)
            raw = _launch_indexer_scores(q, pool, 0, w, W * Eb, None, None, valid_p, "indexer_topk_paged",
                                         keys_fp8=fmt == "fp8", tables=tables)
            in_pool = _index_scores(q, as_fp32(pool[tables].flatten(1, 2)), w).masked_fill(~valid_p, float("-inf"))
            _compare("indexer", f"paged-{fmt}-{case}-scores", raw, in_pool, FP32_REL, FP32_COS_MIN,
                     shape=[T, h, dI, W * Eb])


# ---- compressor -----------------------------------------------------------------------------------------------------

def check_compressor():
    g = torch.Generator().manual_seed(3)
    # (case, W windows, slots, d, dtype); CSA has 2m = 8 slots, HCA m = 128
    cases = [("regular", 4, 8, 64, torch.float32), ("ragged", 5, 6, 100, torch.float32),
             ("ragged-bf16", 5, 6, 100, torch.bfloat16), ("real-tile", 3, 128, 512, torch.float32)]
    for case, W, S, d, dtype in cases:
        kv = torch.randn(W, S, d, generator=g).to(dtype)
        gate = torch.randn(W, S, d, generator=g) * 3
        gate[0, : S // 2] = float("-inf")                 # CSA's first window has no previous half
        kv[0, : S // 2] = 0
        with ran_triton("compress_pool"):
            out = compress_pool(kv, gate)
        ref = compress_pool_ref(kv, gate)
        _compare("compressor", case, out, ref, *_tols(dtype), shape=[W, S, d])


# ---- mHC ------------------------------------------------------------------------------------------------------------

def check_mhc():
    g = torch.Generator().manual_seed(4)
    # (case, N tokens, n streams, D hidden, dtype)
    cases = [("regular", 16, 4, 64, torch.float32), ("ragged", 19, 3, 100, torch.float32),
             ("ragged-bf16", 19, 3, 100, torch.bfloat16), ("real-tile", 20, 4, 1024, torch.float32)]
    for case, N, n, D, dtype in cases:
        x = torch.randn(N, n, D, generator=g).to(dtype)
        fn = torch.randn((2 + n) * n, n * D, generator=g) * 0.5 / math.sqrt(n * D)
        base = torch.randn((2 + n) * n, generator=g) * 0.5
        scale = torch.rand(3, generator=g) + 0.5
        with ran_triton("mhc_weights"):
            out = mhc_weights(x, fn, base, scale, 1e-6, 1e-6, 20)
        ref = mhc_weights_ref(x, fn, base, scale, 1e-6, 1e-6, 20)
        for name, o, r in zip(("pre", "post", "comb"), out, ref):
            _compare("mhc", f"{case}-{name}", o, r, FP32_REL, FP32_COS_MIN, shape=[N, n, D])


# ---- the whole model ------------------------------------------------------------------------------------------------

MODEL_KERNELS = ("expert_mlp", "sink_attention", "sparse_sink_attention", "indexer_topk", "indexer_topk_paged",
                 "compress_pool", "mhc_weights")
MODEL_FP8_KERNELS = ("sparse_sink_attention_fp8",)  # decode over an FP8 cache (its indexer: the paged kernel on bytes)


def _run_model(model, prompt: list[int], decode_steps: int, kv_format: str | None = None) -> list[torch.Tensor]:
    """Prefill `prompt` then greedy-decode through a ModelRunner; the logits of each step."""
    from v4ray.engine.runner import ModelRunner

    runner = ModelRunner(model, 16 << 20, 2, block_size=128, kv_format=kv_format)
    runner.admit("s", len(prompt) + decode_steps)
    logits = [runner.step([("s", prompt, list(range(len(prompt))))])]
    for _ in range(decode_steps):
        token = int(logits[-1][-1].argmax())
        logits.append(runner.step([("s", [token], [0])]))
    return logits


def check_model():
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny

    tokens = [0] + torch.randint(16, 272, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        # fp32 weights; FP4 experts kept packed, so the model drives the dequantize-in-kernel path; and an FP8
        # cache, whose decode reads packed entries in the attention and indexer kernels
        # a prefill runs the indexer only where a query sees more entries than its top-k keeps (else it keeps them
        # all and is skipped): v4-tiny-pro's 20 tokens close 5 windows of its CSA layers (ratio 4), one more than it
        # keeps (4); v4-tiny's 16 tokens close 4 of 16 (72 tokens would be 35 s more of the interpreter)
        for prompt, preset, dtype, keep, kv_format in ((tokens[:16], "v4-tiny", "fp32", False, None),
                                                       (tokens[:16], "v4-tiny", "fp4-experts", True, None),
                                                       (tokens[:16], "v4-tiny", "fp32", False, "fp8"),
                                                       (tokens, "v4-tiny-pro", "fp32", False, None)):
            path = os.path.join(tmp, f"{preset}-{dtype}")
            model = load_model(path if os.path.exists(path) else make_tiny(path, preset=preset, dtype=dtype),
                               torch.float32, keep_quantized=keep)
            os.environ[ENV_KERNELS] = "torch"
            before = dict(triton_calls)
            ref = _run_model(model, prompt, 2, kv_format)
            assert dict(triton_calls) == before, "V4RAY_KERNELS=torch launched a Triton kernel"
            os.environ[ENV_KERNELS] = "triton"
            out = _run_model(model, prompt, 2, kv_format)
            wanted = MODEL_KERNELS if kv_format != "fp8" else tuple(
                k for k in MODEL_KERNELS if k != "sparse_sink_attention") + MODEL_FP8_KERNELS
            cfg = model.cfg
            csa = min(m for kind, m in zip(cfg.layer_types, cfg.compress_ratios) if kind == CSA)
            if len(prompt) // csa <= cfg.index_topk:
                wanted = tuple(k for k in wanted if k != "indexer_topk")
            missing = [k for k in wanted if triton_calls[k] == before.get(k, 0)]
            assert not missing, f"model: Triton path did not run for {missing}"
            for step, (o, r) in enumerate(zip(out, ref)):
                err = float(((o - r).abs().amax(-1) / r.abs().amax(-1)).max())
                RESULTS.append({"family": "model", "case": f"{preset}-{dtype}-{kv_format or 'plain'}-step{step}",
                                "max_rel": err,
                                "max_abs": float((o - r).abs().max())})
                assert err <= MODEL_FP32_REL, f"model {preset}/{dtype} step {step}: rel err {err:.3g}"


FAMILIES = {"moe": check_moe, "attention": check_attention, "indexer": check_indexer,
            "compressor": check_compressor, "mhc": check_mhc, "model": check_model}


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("--")] or list(FAMILIES)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        first = len(RESULTS)
        try:
            FAMILIES[name]()
            status, error = "ok", None
        except Exception as exc:  # report every family, then fail
            status, error = "fail", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            failed += 1
        summary = {"family": name, "status": status, "error": error, "seconds": round(time.perf_counter() - t0, 2),
                   "cases": RESULTS[first:]}
        print("KERNEL_CHECK " + json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
