"""Manifold-constrained hyper-connection weights (mHC, docs/v4_model.md §2.1).

From n residual streams: pre (collapse), post (expand) and comb (stream mixing, projected towards a doubly
stochastic matrix by Sinkhorn iterations). Everything here runs in fp32.

Triton path, two kernels: a split-K GEMM over the flattened streams gives each token's raw mixes x . fn and its
sum of squares (partials per K split, so a few tokens still fill the GPU); an epilogue per token applies the RMS
factor (mix of the normalised x = mix of x * rsqrt(mean x^2 + eps)), the sigmoids, the softmax and all Sinkhorn
iterations on its n x n matrix in registers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import kernel_backend, launch, record_triton_call, triton_interpreted
from .compiled import compile_graph


def mhc_weights_ref(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                    norm_eps: float, hc_eps: float, sinkhorn_iters: int, prefill: bool = False):
    """x [N, n, D] streams -> pre [N, n], post [N, n], comb [N, n, n] (fp32). prefill: the rows of a prompt batch
    (thousands), where a compiled graph calls the `sinkhorn` op; a decode step's few rows keep the loop inline."""
    n = x.shape[1]
    flat = x.reshape(x.shape[0], -1).float()
    # the RMS norm is one scale per row: applied to the (2 + n) * n mixes, not to the n * D inputs (one pass over
    # the streams fewer; the Triton kernel does the same)
    mix = F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.view(-1, n, n) * s[2] + comb_b.view(n, n), dim=-1) + hc_eps
    if prefill and torch.compiler.is_compiling():  # a compiled CPU graph: the op below, not 40 inline reductions
        return pre, post, sinkhorn(comb, hc_eps, sinkhorn_iters)
    return pre, post, sinkhorn_ref(comb, hc_eps, sinkhorn_iters)


def sinkhorn_ref(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """comb [N, n, n] (positive) -> projected towards doubly stochastic in place: its columns normalised, then
    `iters - 1` times its rows and its columns (each sum + eps)."""
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    for _ in range(iters - 1):  # in place: this loop is ~40 tiny ops per call
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(hc_eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    return comb


def _sinkhorn_unrolled(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """`sinkhorn_ref` with each of the n x n entries its own [N] vector: the sums are adds of whole vectors."""
    n = comb.shape[-1]
    c = [[comb[:, i, j] for j in range(n)] for i in range(n)]

    def by_columns(c):
        s = [sum(c[i][j] for i in range(n)) + hc_eps for j in range(n)]
        return [[c[i][j] / s[j] for j in range(n)] for i in range(n)]

    def by_rows(c):
        s = [sum(c[i]) + hc_eps for i in range(n)]
        return [[c[i][j] / s[i] for j in range(n)] for i in range(n)]

    c = by_columns(c)
    for _ in range(iters - 1):
        c = by_columns(by_rows(c))
    return torch.stack([torch.stack(row, dim=-1) for row in c], dim=-2)


_sinkhorn_graph = None


@torch.library.custom_op("v4ray::sinkhorn", mutates_args=())
def sinkhorn(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """`sinkhorn_ref` out of place, as the compiled CPU graphs run it. Traced inline, the loop's reductions over a
    trailing n x n become n-lane vector code with a barrier per step (4 ms for 4096 tokens on 2 cores, in each of
    a layer's two mHC weights); this op is one opaque call in those graphs that runs the unrolled form (every entry
    a vector over the tokens) as an inductor graph of its own, shared by all of them (0.6 ms)."""
    global _sinkhorn_graph
    if _sinkhorn_graph is None:
        _sinkhorn_graph = compile_graph(_sinkhorn_unrolled, dynamic=True)
    # the graphs that call it run it with and without ADInplaceOrView in the dispatch state, which its graph guards
    # on: one state for all (below that key, as an inference graph runs), one graph
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return _sinkhorn_graph(comb, hc_eps, iters)


@sinkhorn.register_fake
def _sinkhorn_shape(comb: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    return torch.empty_like(comb)


@triton.jit
def _mhc_mix_kernel(x_ptr, fn_ptr, mix_ptr, sq_ptr, N, K, OUT, k_per_split, stride_xn, stride_fo,
                    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial mix[split, t, o] = sum_{k in split} x[t, k] fn[o, k] and sq[split, t] = sum x[t, k]^2."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    o = tl.arange(0, BLOCK_O)
    t_mask, o_mask = t < N, o < OUT
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = (k < K) & (k < k_lo + k_per_split)
        xt = tl.load(x_ptr + t[:, None] * stride_xn + k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)                                                 # [BT, BK]
        ft = tl.load(fn_ptr + o[None, :] * stride_fo + k[:, None], mask=o_mask[None, :] & k_mask[:, None],
                     other=0.0).to(tl.float32)                                                 # [BK, BO]
        acc += tl.dot(xt, ft, input_precision="ieee")
        sq += tl.sum(xt * xt, axis=1)
    tl.store(mix_ptr + (split * N + t[:, None]) * BLOCK_O + o[None, :], acc, mask=t_mask[:, None])
    tl.store(sq_ptr + split * N + t, sq, mask=t_mask)


@triton.jit
def _mhc_sinkhorn_kernel(mix_ptr, sq_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr,
                         N, n, K, splits, norm_eps, hc_eps, sinkhorn_iters,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_NS: tl.constexpr):
    """Per token: pre = sigmoid(.) + eps, post = 2 sigmoid(.), comb = Sinkhorn(softmax(.) + eps).
    Tensors are [tokens, i] and [tokens, i, j]; padded i/j cells are kept at exactly zero."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_NS)
    t2, i2 = t[:, None], i[None, :]                                          # [BT, NS]
    t3, i3, j3 = t[:, None, None], i[None, :, None], i[None, None, :]        # [BT, NS, NS]
    vec_mask = (t2 < N) & (i2 < n)
    cell_mask = (t3 < N) & (i3 < n) & (j3 < n)
    cell = 2 * n + i3 * n + j3                                              # comb's column in the mix
    pre_w = tl.zeros((BLOCK_T, BLOCK_NS), dtype=tl.float32)
    post_w = tl.zeros((BLOCK_T, BLOCK_NS), dtype=tl.float32)
    comb_w = tl.zeros((BLOCK_T, BLOCK_NS, BLOCK_NS), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s in range(splits):
        pre_w += tl.load(mix_ptr + (s * N + t2) * BLOCK_O + i2, mask=vec_mask, other=0.0)
        post_w += tl.load(mix_ptr + (s * N + t2) * BLOCK_O + n + i2, mask=vec_mask, other=0.0)
        comb_w += tl.load(mix_ptr + (s * N + t3) * BLOCK_O + cell, mask=cell_mask, other=0.0)
        sq += tl.load(sq_ptr + s * N + t, mask=t < N, other=0.0)
    r = 1.0 / tl.sqrt(sq / K + norm_eps)                                    # RMS norm as a factor on the mix
    r2, r3 = r[:, None], r[:, None, None]
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(pre_w * r2 * s0 + tl.load(base_ptr + i2, mask=i2 < n, other=0.0)) + hc_eps
    post = 2.0 * tl.sigmoid(post_w * r2 * s1 + tl.load(base_ptr + n + i2, mask=i2 < n, other=0.0))
    logits = comb_w * r3 * s2 + tl.load(base_ptr + cell, mask=(i3 < n) & (j3 < n), other=0.0)
    logits = tl.where(j3 < n, logits, float("-inf"))                       # padded columns: no probability
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = e / tl.sum(e, axis=2)[:, :, None] + hc_eps
    comb = tl.where((i3 < n) & (j3 < n), comb, 0.0)                         # padded rows and columns: zero
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    tl.store(pre_ptr + t2 * n + i2, pre, mask=vec_mask)
    tl.store(post_ptr + t2 * n + i2, post, mask=vec_mask)
    tl.store(comb_ptr + t3 * n * n + i3 * n + j3, comb, mask=cell_mask)


def mhc_weights_triton(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                       norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """Triton form of `mhc_weights_ref`: x [N, n, D] -> pre [N, n], post [N, n], comb [N, n, n] (fp32)."""
    N, n, D = x.shape
    K, OUT = n * D, (2 + n) * n
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"mhc_weights_triton: x must be fp32/bf16/fp16, got {x.dtype}")
    if base.shape != (OUT,) or scale.shape != (3,):
        raise ValueError(f"mhc_weights_triton: base must be [{OUT}] and scale [3], got {tuple(base.shape)}, "
                         f"{tuple(scale.shape)}")
    if sinkhorn_iters < 1:
        raise ValueError(f"mhc_weights_triton: sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    if not (x.device == fn.device == base.device == scale.device):
        raise ValueError("mhc_weights_triton: x, fn, base and scale must be on one device")
    flat = x.reshape(N, K)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    fn, base, scale = fn.float().contiguous(), base.float().contiguous(), scale.float().contiguous()
    pre = torch.empty(N, n, dtype=torch.float32, device=x.device)
    post = torch.empty(N, n, dtype=torch.float32, device=x.device)
    comb = torch.empty(N, n, n, dtype=torch.float32, device=x.device)
    if N == 0:
        return pre, post, comb
    block_t, block_k = 16, 64   # a 128-deep k-step spilled 16 B in fp32 (kernels/aot.py checks for spills)
    block_o = max(16, triton.next_power_of_2(OUT))
    # split K so that even a decode step's few tokens give ~2 programs per SM (one split on the interpreter)
    token_blocks = triton.cdiv(N, block_t)
    want = 1 if triton_interpreted() else max(1, 264 // token_blocks)
    splits = min(want, triton.cdiv(K, block_k))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    mix = torch.empty(splits, N, block_o, dtype=torch.float32, device=x.device)
    sq = torch.empty(splits, N, dtype=torch.float32, device=x.device)
    launch(_mhc_mix_kernel, (token_blocks, splits), flat, fn, mix, sq, N, K, OUT, k_per_split, flat.stride(0),
           fn.stride(0), BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_K=block_k)
    launch(_mhc_sinkhorn_kernel, (triton.cdiv(N, block_t),),
        mix, sq, base, scale, pre, post, comb, N, n, K, splits, float(norm_eps), float(hc_eps), int(sinkhorn_iters),
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_NS=max(2, triton.next_power_of_2(n)))
    record_triton_call("mhc_weights")
    return pre, post, comb


def mhc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                norm_eps: float, hc_eps: float, sinkhorn_iters: int, prefill: bool = False):
    """Dispatch point for the mHC pre/post/comb computation: Triton or the torch reference (see `backend`).
    prefill: `mhc_weights_ref`'s."""
    n = x.shape[1]
    if x.dim() != 3 or fn.shape != ((2 + n) * n, n * x.shape[2]):
        raise ValueError(f"mhc_weights: x [N,n,D]={tuple(x.shape)} needs fn [{(2 + n) * n}, {n * x.shape[2]}], "
                         f"got {tuple(fn.shape)}")
    if kernel_backend(x.device) == "triton":
        return mhc_weights_triton(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)
    return mhc_weights_ref(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters, prefill)
