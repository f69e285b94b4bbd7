"""Triton kernels against their torch references at DeepSeek-V4-Flash and V4-Pro shapes, on one CUDA GPU.

Standalone: needs only torch, triton and numpy (no Ray, no installed v4ray). The repo's `kernels/` directory is
loaded by path as the package `v4ray_kernels` (its files import each other relatively), so this runs from a bare
checkout:

    python bench/kernels.py [--models flash pro] [--only moe attention indexer compressor mhc]
    python bench/kernels.py --aot [--models ...] [--only ...]     # no GPU needed

Each row: median time of the Triton wrapper and of the torch reference (triton.testing.do_bench, L2 flushed),
useful FLOPs and bytes of the op (not what a kernel happens to re-read), achieved TFLOP/s and GB/s and their share
of the device's peaks. Writes bench/results/kernels.json. Without a GPU it says so and exits 0.

--aot compiles every kernel configuration the wrappers launch at these shapes for sm_90a and sm_100a (kernels/aot.py:
Triton's compiler and the ptxas in its wheel, no GPU or driver) and prints registers, spill bytes, shared memory and
the tensor-core instructions per kernel, configuration and target; writes bench/results/kernels_aot.json and exits 1
if any configuration spills, exceeds 227 KiB of shared memory or runs bf16 dots without tensor cores.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core FLOP/s and HBM bytes/s by device name (substring match).
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}

# The shapes come from kernels/aot.py (one table for the benchmark and the AOT compiles, checked against
# model/presets by tests/test_kernels_aot.py); load_kernels() fills these in.
MODEL_NAMES = ("flash", "pro")
MODELS: dict[str, dict] = {}
LOCAL_EXPERTS = DECODE_BATCH = PREFILL_TOKENS = CONTEXT = 0


def load_kernels():
    """Import <repo>/kernels as the package `v4ray_kernels` (no v4ray install needed)."""
    spec = importlib.util.spec_from_file_location("v4ray_kernels", REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["v4ray_kernels"] = pkg
    spec.loader.exec_module(pkg)
    kernels = {name: importlib.import_module(f"v4ray_kernels.{name}")
               for name in ("moe", "attention", "indexer", "compressor", "mhc", "quant", "kv_fp8", "aot")}
    global MODELS, LOCAL_EXPERTS, DECODE_BATCH, PREFILL_TOKENS, CONTEXT
    aot = kernels["aot"]
    MODELS, LOCAL_EXPERTS, DECODE_BATCH = aot.MODEL_SHAPES, aot.LOCAL_EXPERTS, aot.DECODE_BATCH
    PREFILL_TOKENS, CONTEXT = aot.PREFILL_TOKENS, aot.CONTEXT
    return kernels


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- cases: each yields (op, shape label, triton fn, torch fn, flops, bytes) ----------------------------------------

def moe_cases(k, m, dev):
    Q = k["quant"].QuantTensor
    D, I, E = m["hidden"], m["inter"], LOCAL_EXPERTS
    g = torch.Generator(device=dev).manual_seed(0)

    def weights(fmt):
        def one(out, inn):
            if fmt == "bf16":
                return Q(torch.randn(out, inn, device=dev, dtype=torch.bfloat16) / inn ** 0.5)
            if fmt == "fp8":
                data = (torch.randn(out, inn, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
                scale = torch.randint(110, 120, (-(-out // 128), -(-inn // 128)), device=dev, dtype=torch.uint8)
                return Q(data, scale, "fp8")
            data = torch.randint(-128, 128, (out, inn // 2), device=dev, dtype=torch.int8)
            scale = torch.randint(115, 125, (out, inn // 32), device=dev, dtype=torch.uint8)
            return Q(data, scale, "fp4")
        return {e: (one(I, D), one(D, I), one(I, D)) for e in range(E)}

    for fmt in ("bf16", "fp8", "fp4"):
        experts = weights(fmt)
        w_bytes_per_expert = sum(w.nbytes for w in experts[0])
        for phase, tokens in (("decode", DECODE_BATCH), ("prefill", PREFILL_TOKENS)):
            rows = tokens * m["topk_experts"] * E // m["experts"]  # rows routed to this shard
            x = torch.randn(rows, D, device=dev, dtype=torch.bfloat16, generator=g)
            idx = torch.randint(0, E, (rows,), device=dev, generator=g)
            w = torch.rand(rows, device=dev, generator=g)
            hit = int(torch.unique(idx).numel())
            flops = 2 * rows * D * I * 3
            byts = hit * w_bytes_per_expert + 2 * nbytes(x) + rows * I * 2
            yield (f"expert_mlp {fmt}", f"{phase} rows={rows} E={E} D={D} I={I}",
                   lambda x=x, idx=idx, w=w, ex=experts: k["moe"].expert_mlp_triton(x, idx, w, ex, 10.0),
                   lambda x=x, idx=idx, w=w, ex=experts: k["moe"].expert_mlp_ref(x, idx, w, ex, 10.0), flops, byts)


def attention_cases(k, m, dev):
    H, d = m["heads"], m["head_dim"]
    # decode: each query over its window ring + the indexer's top-k compressed entries
    n, K = DECODE_BATCH, m["window"] + m["index_topk"]
    q = torch.randn(n, H, d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(n, K, d, device=dev, dtype=torch.bfloat16)
    bias = torch.zeros(n, K, device=dev)
    sinks = torch.randn(H, device=dev)
    yield ("sparse_sink_attention", f"decode n={n} H={H} K={K} d={d}",
           lambda: k["attention"].sparse_sink_attention_triton(q, kv, bias, sinks, d ** -0.5),
           lambda: k["attention"].sparse_sink_attention_ref(q, kv, bias, sinks, d ** -0.5),
           4 * n * H * K * d, nbytes(q, kv, bias, q))
    # the same over FP8 cache entries, dequantized in registers
    rope = m["rope_dim"]
    packed = torch.randint(0, 256, (n, K, k["kv_fp8"].main_entry_bytes(d, rope)), device=dev, dtype=torch.uint8)
    packed[..., d - rope + 2 * rope:] = 120                              # sane ue8m0 scales (and padding)
    packed[..., :d - rope] &= 0x77                                       # finite e4m3 (no NaN codes)
    yield ("sparse_sink_attention_fp8", f"decode n={n} H={H} K={K} d={d}",
           lambda: k["attention"].sparse_sink_attention_fp8_triton(q, packed, bias, sinks, d ** -0.5, d, rope),
           lambda: k["attention"].sparse_sink_attention_fp8_ref(q, packed, bias, sinks, d ** -0.5, d, rope),
           4 * n * H * K * d, nbytes(q, packed, bias, q))
    # prefill chunk: T queries over a sliding window of the chunk plus T/4 compressed entries, all visible
    T = 1024
    S = T + T // 4
    qp = torch.randn(T, H, d, device=dev, dtype=torch.bfloat16)
    kvp = torch.randn(S, d, device=dev, dtype=torch.bfloat16)
    rel = torch.arange(T, device=dev)[None, :] - torch.arange(T, device=dev)[:, None]
    window = torch.zeros(T, T, device=dev).masked_fill((rel > 0) | (rel <= -m["window"]), float("-inf"))
    biasp = torch.cat([window, torch.zeros(T, S - T, device=dev)], dim=1)
    visible = int(torch.isfinite(biasp).sum())
    yield ("sink_attention", f"prefill T={T} S={S} H={H} d={d}",
           lambda: k["attention"].sink_attention_triton(qp, kvp, biasp, sinks, d ** -0.5),
           lambda: k["attention"].sink_attention_ref(qp, kvp, biasp, sinks, d ** -0.5),
           4 * H * visible * d, nbytes(qp, kvp, biasp, qp))


def indexer_cases(k, m, dev):
    h, dI, top = m["index_heads"], m["index_dim"], m["index_topk"]
    C = CONTEXT // 4
    T = 512
    q = torch.randn(T, h, dI, device=dev)
    keys = torch.randn(C, dI, device=dev)
    w = torch.randn(T, h, device=dev) * h ** -0.5
    lo = torch.zeros(T, dtype=torch.long, device=dev)
    hi = torch.full((T,), C, dtype=torch.long, device=dev)
    yield ("indexer_topk", f"prefill T={T} C={C} h={h} dI={dI} k={top}",
           lambda: k["indexer"].indexer_topk_triton(q, keys, w, lo, hi, top),
           lambda: k["indexer"].indexer_topk_ref(q, keys, w, lo, hi, top),
           2 * T * h * C * dI, nbytes(q, keys, w) + T * C * 4)
    n = DECODE_BATCH
    qd, wd = q[:n].contiguous(), w[:n].contiguous()
    keys_p = torch.randn(n, C, dI, device=dev)
    valid = torch.ones(n, C, dtype=torch.bool, device=dev)
    yield ("indexer_topk_padded", f"decode n={n} E={C} h={h} dI={dI} k={top}",
           lambda: k["indexer"].indexer_topk_padded_triton(qd, keys_p, wd, valid, top),
           lambda: k["indexer"].indexer_topk_padded_ref(qd, keys_p, wd, valid, top),
           2 * n * h * C * dI, nbytes(qd, keys_p, wd, valid) + n * C * 4)
    # the decode step's form: the same candidates read in place from a pool of 256-token blocks (64 entries each)
    blk = 64
    pool = keys_p.view(n * (C // blk), blk, dI)
    tables = torch.randperm(n * (C // blk), device=dev).view(n, C // blk)
    yield ("indexer_topk_paged", f"decode n={n} E={C} h={h} dI={dI} k={top}",
           lambda: k["indexer"].indexer_topk_paged_triton(qd, pool, tables, wd, valid, top),
           lambda: k["indexer"].indexer_topk_paged_ref(qd, pool, tables, wd, valid, top),
           2 * n * h * C * dI, nbytes(qd, pool, tables, wd, valid) + n * C * 4)
    packed = torch.randint(0, 256, (n, C, k["kv_fp8"].index_entry_bytes(dI)), device=dev, dtype=torch.uint8)
    packed[..., :dI] &= 0x77                                             # finite e4m3
    packed[..., dI:] = torch.tensor([0, 0, 128, 60], dtype=torch.uint8, device=dev)   # fp32 scale 2^-6
    yield ("indexer_topk_padded_fp8", f"decode n={n} E={C} h={h} dI={dI} k={top}",
           lambda: k["indexer"].indexer_topk_padded_fp8_triton(qd, packed, wd, valid, top),
           lambda: k["indexer"].indexer_topk_padded_fp8_ref(qd, packed, wd, valid, top),
           2 * n * h * C * dI, nbytes(qd, packed, wd, valid) + n * C * 4)


def compressor_cases(k, m, dev):
    d = m["head_dim"]
    for name, ratio, slots in (("CSA", 4, 8), ("HCA", 128, 128)):
        W = PREFILL_TOKENS // ratio
        kv = torch.randn(W, slots, d, device=dev)
        gate = torch.randn(W, slots, d, device=dev)
        yield ("compress_pool", f"{name} W={W} slots={slots} d={d}",
               lambda kv=kv, gate=gate: k["compressor"].compress_pool_triton(kv, gate),
               lambda kv=kv, gate=gate: k["compressor"].compress_pool_ref(kv, gate),
               4 * W * slots * d, nbytes(kv, gate) + W * d * 4)


def mhc_cases(k, m, dev):
    n, D = m["hc"], m["hidden"]
    fn = torch.randn((2 + n) * n, n * D, device=dev) * (n * D) ** -0.5
    base = torch.randn((2 + n) * n, device=dev)
    scale = torch.rand(3, device=dev) + 0.5
    for phase, N in (("decode", DECODE_BATCH), ("prefill", PREFILL_TOKENS)):
        x = torch.randn(N, n, D, device=dev, dtype=torch.bfloat16)
        yield ("mhc_weights", f"{phase} N={N} n={n} D={D}",
               lambda x=x: k["mhc"].mhc_weights_triton(x, fn, base, scale, 1e-6, 1e-6, m["sinkhorn"]),
               lambda x=x: k["mhc"].mhc_weights_ref(x, fn, base, scale, 1e-6, 1e-6, m["sinkhorn"]),
               2 * N * (2 + n) * n * n * D, nbytes(x, fn))


FAMILIES = {"moe": moe_cases, "attention": attention_cases, "indexer": indexer_cases,
            "compressor": compressor_cases, "mhc": mhc_cases}


def aot_main(args) -> int:
    """--aot: every configuration, both targets; a table and bench/results/kernels_aot.json; exit 1 if unclean."""
    import os
    import time

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/kernels.py --aot: unset TRITON_INTERPRET (kernels decorated for the interpreter cannot be "
              "compiled)")
        return 2
    aot = load_kernels()["aot"]
    reason = aot.unavailable()
    if reason:
        print(f"bench/kernels.py --aot: {reason}")
        return 2
    cols = ["kernel", "model", "config", "target", "settings", "regs", "spill_stores", "spill_loads", "shared",
            "tensor_cores", "problems"]
    selection = [(c, tuple(aot.TARGETS)) for c in aot.cases(tuple(args.models), tuple(args.only))]
    t0 = time.perf_counter()

    def show(row):
        row = {**row, "tensor_cores": ",".join(row.get("tensor_cores", [])), "problems": "; ".join(row["problems"])}
        print(table([row], cols).splitlines()[-1], flush=True)

    print(table([], cols))
    rows = aot.compile_cases(selection, progress=show)
    seconds = time.perf_counter() - t0
    shown = [{**r, "tensor_cores": ",".join(r.get("tensor_cores", [])), "problems": "; ".join(r["problems"])}
             for r in rows]
    print()
    print(table(shown, cols))
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} kernel configurations compiled in {seconds:.0f} s; {len(bad)} not clean "
          f"(spills, shared memory > {aot.SHARED_LIMIT} B, or bf16 dots without tensor cores)")
    path = write("kernels_aot", {"triton": __import__("triton").__version__, "targets": list(aot.TARGETS),
                                 "shared_limit": aot.SHARED_LIMIT, "seconds": round(seconds, 1), "rows": rows})
    print(f"wrote {path}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=list(MODEL_NAMES))
    ap.add_argument("--only", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 TFLOP/s")
    ap.add_argument("--peak-gbs", type=float, help="override the device's memory GB/s")
    ap.add_argument("--aot", action="store_true", help="compile every configuration for sm_90a and sm_100a "
                    "ahead of time (no GPU needed) and report registers, spills and shared memory")
    args = ap.parse_args()

    if args.aot:
        return aot_main(args)
    kernels = load_kernels()  # also checks the by-path import on machines without a GPU
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU present; the Triton kernels are benchmarked on a GPU only "
              "(CPU correctness: tests/test_kernels.py under TRITON_INTERPRET=1). Nothing to do.")
        return 0
    import triton.testing

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak_flops, peak_bw = next((p for key, p in PEAKS.items() if key in name), (None, None))
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops
    peak_bw = args.peak_gbs * 1e9 if args.peak_gbs else peak_bw
    print(f"{name}: peaks {peak_flops and peak_flops / 1e12} TFLOP/s bf16 dense, {peak_bw and peak_bw / 1e9} GB/s")

    rows = []
    for model in args.models:
        for fam in args.only:
            for op, shape, fast, ref, flops, byts in FAMILIES[fam](kernels, MODELS[model], dev):
                row = {"model": model, "op": op, "shape": shape, "flops": flops, "bytes": byts}
                try:
                    ms = triton.testing.do_bench(fast, warmup=10, rep=50, return_mode="median")
                except Exception as exc:  # report and keep going: one failing kernel should not hide the rest
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(f"{model} {op} {shape}: triton failed: {row['error']}")
                    continue
                try:
                    ref_ms = triton.testing.do_bench(ref, warmup=3, rep=20, return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    ref_ms = None
                    torch.cuda.empty_cache()
                tflops, gbs = flops / ms / 1e9, byts / ms / 1e6
                row.update(triton_ms=round(ms, 4), torch_ms=ref_ms and round(ref_ms, 4),
                           speedup=ref_ms and round(ref_ms / ms, 2), tflops=round(tflops, 2), gbs=round(gbs, 1),
                           pct_peak_flops=peak_flops and round(100 * tflops * 1e12 / peak_flops, 1),
                           pct_peak_bw=peak_bw and round(100 * gbs * 1e9 / peak_bw, 1))
                rows.append(row)
                print(table([row], ["model", "op", "shape", "triton_ms", "torch_ms", "speedup", "tflops", "gbs",
                                    "pct_peak_flops", "pct_peak_bw"]).splitlines()[-1], flush=True)
            torch.cuda.empty_cache()
    print()
    print(table(rows, ["model", "op", "shape", "triton_ms", "torch_ms", "speedup", "tflops", "gbs",
                       "pct_peak_flops", "pct_peak_bw"]))
    path = write("kernels", {"device": name, "peak_flops": peak_flops, "peak_bytes_per_s": peak_bw,
                             "triton": __import__("triton").__version__, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
