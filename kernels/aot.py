"""Ahead-of-time compilation of every Triton kernel here for sm_90a and sm_100a, with no GPU and no driver.

What is compiled is what the wrappers launch: every wrapper launches through `backend.launch`, and inside
`recording()` that records the kernel, its arguments and its launch settings (block sizes, warps, stages) instead
of running it. `CASES` runs the wrappers on meta tensors at DeepSeek-V4-Flash and V4-Pro shapes (`MODEL_SHAPES`,
checked against model/presets by tests/test_kernels_aot.py), so block sizes live in the wrappers only and this
table cannot drift from them. Each recorded launch is specialized as Triton's launcher would (dtypes, 16-byte
alignment, ints divisible by 16, ints equal to 1) and compiled by `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`; ptxas ships in the Triton wheel. A row then holds:

* `regs`, `spill_stores`, `spill_loads` (bytes): ptxas's -v log (the driver, absent here, is what fills
  `CompiledKernel.n_regs`/`n_spills` at load time),
* `shared` (bytes): the compiled kernel's metadata (static + pipelining buffers), to be <= `SHARED_LIMIT`,
* `tensor_cores`: the tensor-core instructions in the PTX: `mma.sync` (warp MMA, sm_80+), `wgmma` (sm_90
  warpgroup MMA), `tcgen05.mma` (sm_100).

Import this in a process without TRITON_INTERPRET: kernels decorated for the interpreter cannot be compiled.
`python bench/kernels.py --aot` compiles every case; tests/test_kernels_aot.py a subset.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import backend

TARGETS = {"sm_90a": 90, "sm_100a": 100}
SHARED_LIMIT = 232448                     # 227 KiB: the most shared memory one block may use on H100/H200/B200
TENSOR_CORE_OPS = {"mma.sync": r"\bmma\.sync\.", "wgmma": r"\bwgmma\.mma_async\.", "tcgen05.mma": r"\btcgen05\.mma\."}

# The shapes the kernels see (model/presets/deepseek-v4-*.json; tests/test_kernels_aot.py checks they agree).
MODEL_SHAPES = {
    "flash": dict(hidden=4096, heads=64, head_dim=512, rope_dim=64, inter=2048, experts=256, topk_experts=6,
                  index_heads=64, index_dim=128, index_topk=512, hc=4, sinkhorn=20, window=128),
    "pro": dict(hidden=7168, heads=128, head_dim=512, rope_dim=64, inter=3072, experts=384, topk_experts=6,
                index_heads=64, index_dim=128, index_topk=1024, hc=4, sinkhorn=20, window=128),
}
LOCAL_EXPERTS = 32        # experts on one expert-parallel shard (EP=8 for Flash, EP=12 for Pro)
DECODE_BATCH = 64         # sequences per decode step
CHUNK_TOKENS = 1024       # tokens of a chunked-prefill step
PREFILL_TOKENS = 4096     # tokens of a long prefill step
CONTEXT = 32768           # context tokens behind a decode query (indexer candidates: CONTEXT / 4)
CSA_RATIO, HCA_RATIO = 4, 128
BLOCK_SIZE = 256          # tokens per KV-cache block (the engine's default for V4's rates)


def unavailable() -> str | None:
    """Why AOT compilation cannot run in this process, or None when it can."""
    if backend.triton_interpreted():
        return "the kernels were decorated under TRITON_INTERPRET=1; compile them in a process without it"
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
        if "nvidia" not in backends:
            return "this Triton has no NVIDIA backend"
        path = get_ptxas(90).path
    except Exception as exc:  # an old or CPU-only Triton
        return f"this Triton cannot compile for CUDA without a GPU ({type(exc).__name__}: {exc})"
    if not path:
        return "this Triton ships no ptxas"
    return None


# ---- recording what the wrappers launch -----------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: object            # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__.strip("_").removesuffix("_kernel")

    def bound(self) -> tuple[dict, dict]:
        """(kernel argument name -> value, launch options such as num_warps)."""
        names = self.kernel.arg_names
        values = dict(zip(names, self.args))
        options = {}
        for k, v in self.kwargs.items():
            (values if k in names else options)[k] = v
        return values, options

    def settings(self) -> str:
        """The launch settings: constexpr block sizes and flags, warps, stages."""
        values, options = self.bound()
        const = {p.name: values[p.name] for p in self.kernel.params if p.is_constexpr}
        parts = [f"{k}={_short(v)}" for k, v in const.items()]
        parts += [f"warps={options.get('num_warps', 4)}", f"stages={options.get('num_stages', 3)}"]
        return " ".join(parts)


def _short(v) -> str:
    return str(v).replace("triton.language.", "").replace("tl.", "")


@contextlib.contextmanager
def recording():
    """Inside: wrappers record their launches (yielded list of `Launch`) instead of running them."""
    if backend._recorded_launches is not None:
        raise RuntimeError("aot.recording() does not nest")
    raw: list = []
    launches: list[Launch] = []
    backend._recorded_launches = raw
    try:
        yield launches
    finally:
        backend._recorded_launches = None
        launches.extend(Launch(*r) for r in raw)


# ---- compiling one launch -------------------------------------------------------------------------------------------

def specialize(launch: Launch, target) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for `triton.compile`, specialized as Triton's launcher does."""
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import make_backend

    be = make_backend(target)
    values, options = launch.bound()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(launch.kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(be, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":          # an int equal to 1 is folded into the kernel, as at launch
            constexprs[p.name] = spec
        elif spec:
            attrs[(i,)] = be.parse_attr(spec)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, target_name: str) -> dict:
    """Compile `launch` for one target -> {regs, spill_stores, spill_loads, shared, tensor_cores, seconds} (or
    {error}); nothing is cached, so ptxas always runs and reports."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", TARGETS[target_name], 32)
    t0 = time.perf_counter()
    signature, constexprs, attrs, options = specialize(launch, target)
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = log.getvalue()
    regs = re.search(r"Compiling entry function '\w+'.*?Used (\d+) registers", text, re.S)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)  # every function's
    if regs is None or not spills:
        return {"error": f"no register/spill report in ptxas's log: {text[-300:]!r}",
                "seconds": round(time.perf_counter() - t0, 2)}
    ptx = compiled.asm["ptx"]
    return {"regs": int(regs.group(1)), "spill_stores": sum(int(s) for s, _ in spills),
            "spill_loads": sum(int(lo) for _, lo in spills),
            "shared": int(compiled.metadata.shared),
            "tensor_cores": [op for op, pat in TENSOR_CORE_OPS.items() if re.search(pat, ptx)],
            "seconds": round(time.perf_counter() - t0, 2)}


# ---- the configurations the wrappers launch at V4 shapes -----------------------------------------------------------

@dataclass(frozen=True)
class Case:
    family: str                       # moe, attention, indexer, compressor, mhc
    model: str                        # flash | pro
    config: str                       # dtypes and phase, e.g. "fp8 w, bf16 x, decode"
    dtype: str                        # the dtype key the CI subset picks one configuration per kernel of
    call: Callable[[], object] = field(compare=False)  # runs the wrapper on meta tensors
    tensor_cores: bool = False        # its dots are bf16: they must use tensor-core instructions
    decode: bool = False

    def launches(self) -> list[Launch]:
        with recording() as launches:
            self.call()
        if not launches:
            raise RuntimeError(f"{self.family} {self.config}: the wrapper launched nothing")
        return launches


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _moe_cases(model: str, m: dict):
    from .moe import expert_mlp_triton
    from .quant import FP4_BLOCK, FP8_BLOCK, QuantTensor

    D, I, G = m["hidden"], m["inter"], LOCAL_EXPERTS

    def weight(fmt, dtype, out, inn):
        if fmt == "fp8":
            return QuantTensor(_meta(out, inn, dtype=torch.float8_e4m3fn),
                               _meta(-(-out // FP8_BLOCK), -(-inn // FP8_BLOCK), dtype=torch.uint8), "fp8")
        if fmt == "fp4":
            return QuantTensor(_meta(out, inn // 2, dtype=torch.int8), _meta(out, inn // FP4_BLOCK, dtype=torch.uint8),
                               "fp4")
        return QuantTensor(_meta(out, inn, dtype=dtype))

    def call(fmt, dtype, rows):
        experts = {e: (weight(fmt, dtype, I, D), weight(fmt, dtype, D, I), weight(fmt, dtype, I, D)) for e in range(G)}
        return lambda: expert_mlp_triton(_meta(rows, D, dtype=dtype), _meta(rows, dtype=torch.long), _meta(rows),
                                         experts, 10.0)

    for fmt in ("plain", "fp8", "fp4"):
        for dt in ("bf16", "fp32"):
            for phase, tokens in (("decode", DECODE_BATCH), ("chunk", CHUNK_TOKENS), ("prefill", PREFILL_TOKENS)):
                rows = tokens * m["topk_experts"] * G // m["experts"]      # rows routed to this shard
                w = dt if fmt == "plain" else fmt
                yield Case("moe", model, f"{w} w, {dt} x, {phase} {rows} rows", f"{w} w, {dt} x",
                           call(fmt, _DTYPES[dt], rows), tensor_cores=dt == "bf16", decode=phase == "decode")


def _attention_cases(model: str, m: dict):
    from .attention import sink_attention_triton, sparse_sink_attention_fp8_triton, sparse_sink_attention_triton
    from .kv_fp8 import main_entry_bytes

    H, d, rope = m["heads"], m["head_dim"], m["rope_dim"]
    n, K = DECODE_BATCH, m["window"] + m["index_topk"]
    T = CHUNK_TOKENS
    S = T + T // CSA_RATIO
    for dt in ("bf16", "fp32"):
        dtype = _DTYPES[dt]
        yield Case("attention", model, f"sparse {dt}, decode n={n} K={K}", dt,
                   lambda dtype=dtype: sparse_sink_attention_triton(_meta(n, H, d, dtype=dtype),
                                                                    _meta(n, K, d, dtype=dtype), _meta(n, K),
                                                                    _meta(H), d ** -0.5),
                   tensor_cores=dt == "bf16", decode=True)
        yield Case("attention", model, f"sparse fp8 kv, {dt} q, decode n={n} K={K}", f"fp8 kv, {dt} q",
                   lambda dtype=dtype: sparse_sink_attention_fp8_triton(
                       _meta(n, H, d, dtype=dtype), _meta(n, K, main_entry_bytes(d, rope), dtype=torch.uint8),
                       _meta(n, K), _meta(H), d ** -0.5, d, rope),
                   tensor_cores=dt == "bf16", decode=True)
        yield Case("attention", model, f"dense {dt}, prefill T={T} S={S}", dt,
                   lambda dtype=dtype: sink_attention_triton(_meta(T, H, d, dtype=dtype), _meta(S, d, dtype=dtype),
                                                             _meta(T, S), _meta(H), d ** -0.5),
                   tensor_cores=dt == "bf16")


def _indexer_cases(model: str, m: dict):
    from .indexer import (indexer_scores_paged_triton, indexer_topk_padded_fp8_triton, indexer_topk_padded_triton,
                          indexer_topk_triton)
    from .kv_fp8 import index_entry_bytes

    h, dI, top = m["index_heads"], m["index_dim"], m["index_topk"]
    n, E = DECODE_BATCH, CONTEXT // CSA_RATIO
    T, C = CHUNK_TOKENS, CONTEXT // CSA_RATIO
    for dt in ("bf16", "fp32"):
        dtype = _DTYPES[dt]
        # decode: the model reads the candidate keys in fp32 (q and weights in its compute dtype)
        yield Case("indexer", model, f"padded {dt} q, fp32 keys, decode n={n} E={E}", dt,
                   lambda dtype=dtype: indexer_topk_padded_triton(
                       _meta(n, h, dI, dtype=dtype), _meta(n, E, dI), _meta(n, h, dtype=dtype),
                       _meta(n, E, dtype=torch.bool), top), decode=True)
        yield Case("indexer", model, f"padded {dt} q, fp8 keys, decode n={n} E={E}", f"fp8 keys, {dt} q",
                   lambda dtype=dtype: indexer_topk_padded_fp8_triton(
                       _meta(n, h, dI, dtype=dtype), _meta(n, E, index_entry_bytes(dI), dtype=torch.uint8),
                       _meta(n, h, dtype=dtype), _meta(n, E, dtype=torch.bool), top), decode=True)
        # the decode step's form: the keys read in place from the cache's pool through the block tables
        blk, W = BLOCK_SIZE // CSA_RATIO, CONTEXT // BLOCK_SIZE
        yield Case("indexer", model, f"paged {dt} q, fp32 keys, decode n={n} E={W}x{blk}", dt,
                   lambda dtype=dtype: indexer_scores_paged_triton(
                       _meta(n, h, dI, dtype=dtype), _meta(n * W, blk, dI), _meta(n, W, dtype=torch.long),
                       _meta(n, h, dtype=dtype), _meta(n, W * blk, dtype=torch.bool)), decode=True)
        yield Case("indexer", model, f"paged {dt} q, fp8 keys, decode n={n} E={W}x{blk}", f"fp8 keys, {dt} q",
                   lambda dtype=dtype: indexer_scores_paged_triton(
                       _meta(n, h, dI, dtype=dtype), _meta(n * W, blk, index_entry_bytes(dI), dtype=torch.uint8),
                       _meta(n, W, dtype=torch.long), _meta(n, h, dtype=dtype), _meta(n, W * blk, dtype=torch.bool)),
                   decode=True)
        yield Case("indexer", model, f"{dt}, prefill T={T} C={C}", dt,
                   lambda dtype=dtype: indexer_topk_triton(
                       _meta(T, h, dI, dtype=dtype), _meta(C, dI, dtype=dtype), _meta(T, h, dtype=dtype),
                       _meta(T, dtype=torch.long), _meta(T, dtype=torch.long), top))


def _compressor_cases(model: str, m: dict):
    from .compressor import compress_pool_triton

    for dt in ("fp32", "bf16"):       # the model pools fp32 rings; the wrapper also takes bf16
        for name, slots, d in (("CSA", 2 * CSA_RATIO, m["head_dim"]), ("HCA", HCA_RATIO, m["head_dim"]),
                               ("CSA index", 2 * CSA_RATIO, m["index_dim"])):
            W = PREFILL_TOKENS // (slots if name == "HCA" else CSA_RATIO)
            yield Case("compressor", model, f"{name} {dt}, W={W} slots={slots} d={d}", dt,
                       lambda dtype=_DTYPES[dt], W=W, slots=slots, d=d: compress_pool_triton(
                           _meta(W, slots, d, dtype=dtype), _meta(W, slots, d, dtype=dtype)))


def _mhc_cases(model: str, m: dict):
    from .mhc import mhc_weights_triton

    n, D = m["hc"], m["hidden"]
    for dt in ("bf16", "fp32"):
        for phase, N in (("decode", DECODE_BATCH), ("prefill", PREFILL_TOKENS)):
            yield Case("mhc", model, f"{dt}, {phase} N={N}", dt,
                       lambda dtype=_DTYPES[dt], N=N: mhc_weights_triton(
                           _meta(N, n, D, dtype=dtype), _meta((2 + n) * n, n * D), _meta((2 + n) * n), _meta(3),
                           1e-6, 1e-6, m["sinkhorn"]), decode=phase == "decode")


FAMILIES = {"moe": _moe_cases, "attention": _attention_cases, "indexer": _indexer_cases,
            "compressor": _compressor_cases, "mhc": _mhc_cases}


def cases(models=tuple(MODEL_SHAPES), families=tuple(FAMILIES)) -> list[Case]:
    return [c for model in models for fam in families for c in FAMILIES[fam](model, MODEL_SHAPES[model])]


def ci_subset(all_cases: list[Case]) -> list[tuple[Case, tuple[str, ...]]]:
    """One configuration per kernel and dtype (the first listed: decode where a family has one; for the expert GEMMs
    also the prefill tile, the warpgroup-MMA path), V4-Flash, on both targets (the whole subset compiles in well
    under a minute on 2 cores; sm_100a has spilled where sm_90a did not)."""
    picked: dict[tuple, Case] = {}
    for c in all_cases:
        if c.model != "flash":
            continue
        kind = c.config.split(",")[0].split(" ")[0]                          # sparse/dense, padded/prefill, ...
        phase = c.config.rsplit(",", 1)[-1].split()[0] if c.family == "moe" else ""
        if c.family == "moe" and phase not in ("decode", "prefill"):
            continue
        picked.setdefault((c.family, kind if c.family in ("attention", "indexer") else "", c.dtype, phase), c)
    return [(c, tuple(TARGETS)) for c in picked.values()]


def problems(row: dict) -> list[str]:
    """What makes a compiled row unclean: an error, spills, too much shared memory, bf16 dots without tensor cores."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads ({row['regs']} registers)")
    if row["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT} B")
    if row.get("tensor_cores_required") and not row["tensor_cores"]:
        out.append("bf16 dots without tensor-core instructions")
    return out


def compile_cases(selection: list[tuple[Case, tuple[str, ...]]], progress: Callable[[dict], None] | None = None
                  ) -> list[dict]:
    """Every launch of every case compiled for its targets, one row each. Launches whose specialization is the same
    (e.g. V4-Flash and V4-Pro widths, both multiples of 16) are compiled once and reported for each."""
    from triton.backends.compiler import GPUTarget

    done: dict[str, dict] = {}
    rows = []
    for case, targets in selection:
        for launch in case.launches():
            for t in targets:
                key = repr((launch.kernel.cache_key, t, specialize(launch, GPUTarget("cuda", TARGETS[t], 32))))
                if key not in done:
                    done[key] = compile_launch(launch, t)
                row = {"family": case.family, "kernel": launch.name, "model": case.model, "config": case.config,
                       "target": t, "settings": launch.settings(), "tensor_cores_required": case.tensor_cores,
                       "decode": case.decode, **done[key]}
                row["problems"] = problems(row)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m v4ray.kernels.aot [--all]`: compile the CI subset (or every case) and print one `AOT_ROW {json}`
    line per row (tests/test_kernels_aot.py reads them); `AOT_SKIP reason` when this Triton cannot compile."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every case on both targets, not the CI subset")
    args = ap.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"AOT_SKIP {reason}", flush=True)
        return 0
    all_cases = cases()
    selection = [(c, tuple(TARGETS)) for c in all_cases] if args.all else ci_subset(all_cases)
    compile_cases(selection, progress=lambda row: print("AOT_ROW " + json.dumps(row), flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
