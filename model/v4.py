"""The DeepSeek-V4 forward pass in plain torch, top to bottom in forward order (docs/v4_model.md §2).

Module and tensor names follow the official checkpoint (`layers.L.attn.wq_a.weight`, `hc_head_fn`, ...), so
loading is a walk over `named_buffers()`. Hot ops go through `v4ray.kernels` dispatch functions.

Numerics. fp32 matches transformers' `DeepseekV4ForCausalLM` (the parity reference). bf16 follows DeepSeek's
reference `inference/model.py`: linears in bf16, but norms, RoPE, mHC (including the stream mixing), router
logits, compressor projections and pooling, attention softmax and the LM head run in fp32. Where transformers
differs in bf16: it computes router logits, compressor projections and the LM head in bf16, mixes mHC streams
in bf16, and quantizes attention probabilities to bf16 before the value sum (docs/v4_model.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from v4ray.kernels import (compress_pool, expert_mlp, indexer_topk, indexer_topk_padded, indexer_topk_paged,
                           mhc_weights, sink_attention, sparse_sink_attention, sparse_sink_attention_fp8)
from v4ray.kernels.attention import banded_sink_attention
from v4ray.kernels.backend import kernel_backend
from v4ray.kernels.compiled import compile_graph
from v4ray.kernels.moe import expert_mlp_grouped, expert_offsets, stack_experts, swiglu_clamped
from v4ray.kernels.quant import QuantTensor

from .config import CSA, HCA, SWA, V4Config, yarn_inv_freq
from .kv_cache import DecodeBatch, DecodeTables, LayerCache, StepBatch, state_rows
from .kv_format import pack_main, unpack_main

# Tensors kept in fp32 whatever the compute dtype (transformers' `_keep_in_fp32_modules_strict`, REF alike).
FP32_SUFFIXES = ("norm.weight", "attn_sink", "ape", "gate.bias", "hc_attn_fn", "hc_attn_base", "hc_attn_scale",
                 "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "hc_head_fn", "hc_head_base", "hc_head_scale")


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---- building blocks ------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in fp32 with an fp32 weight, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", _meta(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (weight * (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Linear(nn.Module):
    """y = x W^T. `weight` is plain, or FP8/FP4 as stored with `scale` (dequantized per call when kept
    quantized). `fp32=True` computes in fp32 whatever x's dtype (router, compressor, LM head); the loader stores
    such a weight in fp32, so the `.float()` below casts nothing."""

    def __init__(self, in_features: int, out_features: int, fp32: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fp32 = in_features, out_features, fp32
        self.fmt: str | None = None
        self.register_buffer("weight", _meta(out_features, in_features))
        self.register_buffer("scale", None)

    def qweight(self) -> QuantTensor:
        return QuantTensor(self.weight, self.scale, self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            w = self.weight.float() if self.fmt is None else self.qweight().dequantize(torch.float32)
            return F.linear(x.float(), w)
        w = self.weight if self.fmt is None else self.qweight().dequantize(x.dtype)
        return F.linear(x, w)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved-pair RoPE on the trailing 2*cos.shape[-1] dims of x.

    cos/sin [..., r/2] broadcast against x[..., r/2] (e.g. [T, 1, r/2] for x [T, H, d]); pairs (x_2i, x_2i+1) rotate by the angle (negated when `inverse`), in fp32."""
    r = cos.shape[-1] * 2
    if inverse:
        sin = -sin
    rot = x[..., -r:].float().unflatten(-1, (r // 2, 2))
    x0, x1 = rot[..., 0], rot[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-r], out], dim=-1)


# ---- mHC ------------------------------------------------------------------------------------------------

def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast to the streams' dtype. x [N, n, D], pre [N, n] -> [N, D]."""
    return (pre[..., None] * x).sum(dim=1).to(x.dtype)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k y + sum_j comb[j, k] X_j (comb applied transposed), mixed in fp32.

    On a GPU one batched matmul; elsewhere the n terms written out: a batch of thousands of n x n by n x D
    products runs at a few percent of the GEMM rate on a CPU (a prompt batch spent ~12 % of its prefill there),
    while the sum is one pass that a compiled graph fuses with its neighbours."""
    xf = x.float()
    mixed = post[..., None] * y.float()[:, None, :]
    if x.is_cuda:
        return (mixed + torch.matmul(comb.transpose(-1, -2), xf)).to(x.dtype)
    terms = comb[:, 0, :, None] * xf[:, 0, None, :]
    for j in range(1, x.shape[1]):
        terms = terms + comb[:, j, :, None] * xf[:, j, None, :]
    return (mixed + terms).to(x.dtype)


def hc_enter(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
             norm_eps: float, hc_eps: float, sinkhorn_iters: int, prefill: bool = False):
    """A sublayer's way in: the mHC weights of the streams x [N, n, D], their collapse, the sublayer's input norm.
    -> (u [N, D], post [N, n], comb [N, n, n]). prefill: `mhc_weights`'."""
    pre, post, comb = mhc_weights(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters, prefill)
    return rms_norm(hc_collapse(x, pre), norm_weight, norm_eps), post, comb


class StepRegions:
    """The variable-shape (`StepBatch`) step's pieces around its data-dependent attention: the way into the attention
    sublayer (mHC weights, collapse, norm, projections, RoPE), the way out (inverse RoPE, output projections, mHC
    expansion), a prefill group's attention (dense, or a long chunk's window as a band: `StepBatch.banded`), a
    compressor's emit, and the whole MoE sublayer where its experts run here, grouped on the
    device. Plain functions in `EAGER_REGIONS` (the reference); `StepRegions(compile_=True)` makes each an inductor
    graph with its row counts symbolic (docs/architecture.md §12): on the torch backend these pieces are hundreds of
    small ops per layer, where a batch of prompts spent most of its prefill. A graph serves every layer of a kind (the
    block is an argument, its weights graph inputs). The fixed-shape decode step runs the plain functions inside its
    own whole-step graph."""

    # per positional argument, the dimensions that vary from call to call (rows, keys); None: not a tensor
    VARYING = {"attn_enter": (None, (0,), (0,), None), "attn_leave": (None, (0,), (0,), (0,), (0,), (0,), (0,)),
               "ffn": (None, (0,), (0,)), "attention": ((0,), (0,), (0, 1)),
               "indexed_attention": (None, (0,), (0,), (0, 1), (0,), (0,), (0,), (0,), (0,), (0,), (0,), (0,)),
               "stacked_attention": ((0, 1), (0, 1), (0, 1)),
               "stacked_indexed_attention": (None, (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0,),
                                             (0,), (0,), (0,)),
               "emit": (None, None, (0,), (0,), (0,), (0,), (0,), (0,), (0,), (0,)),
               "window_attention": (None, (0,), (0,), None, (0,), (0, 1)),
               "indexed_window_attention": (None, (0,), (0,), None, (0,), (0,), (0,), (0,), (0,), (0,), (0,),
                                            (0,))}

    def __init__(self, compile_: bool = False):
        self.compiled = compile_
        for name, fn in (("attn_enter", attn_enter), ("attn_leave", attn_leave), ("ffn", ffn_sublayer),
                         ("attention", sink_attention), ("indexed_attention", indexed_attention),
                         ("stacked_attention", sink_attention), ("stacked_indexed_attention", indexed_attention),
                         ("emit", compressor_emit), ("window_attention", window_attention),
                         ("indexed_window_attention", indexed_window_attention)):
            setattr(self, name, _symbolic(fn, self.VARYING[name]) if compile_ else fn)

    def emit_for(self, rows: int, windows: int):
        """A compressor's emit: compiled for a prefill's rows and windows; eagerly where either is one (a size of 1
        would be a graph of its own, compiled on first use: steps of single tokens close a window or none)."""
        return self.emit if self.compiled and rows > 1 and windows > 1 else EAGER_REGIONS.emit

    def ffn_for(self, block: "Block", x: torch.Tensor):
        """The MoE sublayer's function: compiled only where its routed experts run here, grouped (an exchange with
        expert shards, or a per-expert loop over weights kept quantized, reads the host)."""
        return self.ffn if self.compiled and block.ffn.uses_grouped(x) else EAGER_REGIONS.ffn

    # The warm-up's sizes: the first call's sizes are the symbolic sizes' hints, by which inductor decides, among
    # others, whether a loop is worth its threads (a prefill has thousands of rows, a group ~128 queries over ~256
    # keys; hints of 3 rows left the attention's softmax and the indexer's scores on one core). Distinct values:
    # two symbolic sizes that meet with equal sizes are traced as one (a guard that recompiles when they differ).
    WARM_ROWS, WARM_QUERIES, WARM_KEYS, WARM_ENTRIES, WARM_RING_SLOTS, WARM_STACK = 1021, 125, 251, 61, 67, 29

    @torch.no_grad()  # as the step runs (grad mode is part of a graph's guards)
    def warm_up(self, model: "V4Model") -> None:
        """Compile every piece for every layer kind before the first request, on zeros: one call at the sizes of a
        prefill (`WARM_ROWS`...: symbolic from then on) and one with 1 row (a size of 1 is a graph of its own)."""
        c = model.cfg
        zeros = lambda *shape, dtype=model.dtype: torch.zeros(*shape, dtype=dtype, device=model.device)
        for rows in (self.WARM_ROWS, 1):
            x, ids = zeros(rows, c.hc_mult, c.hidden_size), zeros(rows, dtype=torch.long)
            for block in model.layers:
                (u, c_q, q, kv, cos, sin), post, comb = self.attn_enter(block, x, ids, True)
                self.attn_leave(block, x, q, cos, sin, post, comb)
                if self.ffn_for(block, x) is not EAGER_REGIONS.ffn:  # never an exchange: no shard is listening
                    block.ffn.stacked_experts()  # built once, eagerly: not inside a trace
                    self.ffn(block, x, ids, False)
        T, K = self.WARM_QUERIES, self.WARM_KEYS
        q, keys = zeros(T, c.num_attention_heads, c.head_dim), zeros(K, c.head_dim)
        bias = zeros(T, K, dtype=torch.float32)
        G, sink, scale = self.WARM_STACK, model.layers[0].attn.attn_sink, c.head_dim ** -0.5
        self.attention(q, keys, bias, sink, scale)
        self.stacked_attention(zeros(G, *q.shape), zeros(G, *keys.shape), bias, sink, scale)
        csa = next((b.attn for b in model.layers if b.attn.indexer is not None), None)
        if csa is not None:  # a prefill group only takes it with more entries than the indexer keeps: E > top-k
            E = max(csa.indexer.topk + 1, self.WARM_ENTRIES)
            E += E in (T, K, G)  # unlike the other sizes
            lo, hi = zeros(T, dtype=torch.long), torch.full((T,), E, dtype=torch.long, device=model.device)
            entries, index_keys = zeros(E, c.head_dim), zeros(E, c.index_head_dim, dtype=torch.float32)
            u, c_q = zeros(T, c.hidden_size), zeros(T, c.q_lora_rank)
            cos, sin = rope_cos_sin(zeros(T, dtype=torch.long), csa.inv_freq)
            self.indexed_attention(csa, q, keys, bias, entries, index_keys, u, c_q, cos, sin, lo, hi)
            stack = lambda t: t.expand(G, *t.shape).contiguous()
            self.stacked_indexed_attention(csa, stack(q), stack(keys), bias, stack(entries), stack(index_keys),
                                           stack(u), stack(c_q), cos, sin, lo, hi)
        if not self.compiled:
            return
        # banded groups (`StepBatch.banded`), per kind of layer: a chunk of at least BANDED_MIN_WINDOWS windows (more
        # than one block of queries: a count of 1 would be a graph of its own)
        n, E = StepBatch.BANDED_MIN_WINDOWS * c.sliding_window + 5, self.WARM_ENTRIES
        q = zeros(n, c.num_attention_heads, c.head_dim)
        keys, pad = zeros(c.sliding_window - 1 + n, c.head_dim), zeros(1, dtype=torch.long)
        entries, entry_bias = zeros(E, c.head_dim), zeros(n, E, dtype=torch.float32)
        for block in model.layers:
            self.window_attention(block.attn, q, keys, pad, entries, entry_bias)
            if block.attn.indexer is not None:
                lo, hi = zeros(n, dtype=torch.long), torch.full((n,), E, dtype=torch.long, device=model.device)
                self.indexed_window_attention(block.attn, q, keys, pad, entries, zeros(E, c.index_head_dim,
                                              dtype=torch.float32), zeros(n, c.hidden_size), zeros(n, c.q_lora_rank),
                                              *rope_cos_sin(zeros(n, dtype=torch.long), block.attn.inv_freq), lo, hi)
        kinds = {}  # one graph per kind of compressor (CSA, its indexer's, HCA): their shapes differ
        for b in model.layers:
            for comp in (b.attn.compressor, b.attn.indexer.compressor if b.attn.indexer is not None else None):
                if comp is not None:
                    kinds.setdefault((comp.ratio, comp.dim, comp.overlap), (b.attn, comp))
        N, S = self.WARM_ROWS, self.WARM_RING_SLOTS
        for attn, comp in kinds.values():
            W, R, width = N // comp.ratio, state_rows(CSA if comp.overlap else HCA, comp.ratio), comp.wkv.out_features
            rows, prev = (zeros(W, comp.ratio, dtype=torch.long) for _ in range(2))  # two: aliasing is guarded
            self.emit(comp, attn.inv_freq, zeros(N, c.hidden_size), zeros(N, dtype=torch.long),
                      zeros(S * R, width, dtype=torch.float32), zeros(S * R, width, dtype=torch.float32), rows, prev,
                      zeros(W, dtype=torch.bool), zeros(W, dtype=torch.long))


def _symbolic(fn, varying):
    """torch.compile(fn, fullgraph=True) with the `varying` dimensions of its tensor arguments symbolic from the first
    call (the others stay fixed; a size of 0 or 1 gets its own graph)."""
    compiled = compile_graph(fn)

    def call(*args):
        for t, dims in zip(args, varying):
            for d in dims or ():
                torch._dynamo.maybe_mark_dynamic(t, d)
        return compiled(*args)
    return call


def attn_enter(block: "Block", x: torch.Tensor, positions: torch.Tensor, prefill: bool = False):
    """x [N, n, D] streams -> ((u, c_q, q, kv, cos, sin) of `Attention.project`, post, comb). prefill: a `StepBatch`
    step's rows (`mhc_weights`)."""
    u, post, comb = block.enter("attn", x, prefill)
    return (u, *block.attn.project(u, positions)), post, comb


def attn_leave(block: "Block", x: torch.Tensor, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The attention output o [N, H, d] back into the streams x [N, n, D]."""
    return hc_expand(x, block.attn.output(o, cos, sin), post, comb)


def indexed_attention(attn: "Attention", q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, entries: torch.Tensor,
                      index_keys: torch.Tensor, u: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A CSA prefill group's attention: queries q [T, H, d] over their window keys [K, d] (bias [T, K]) and the
    lightning indexer's top-k of the compressed entries [E, d] each query may see ([lo_t, hi_t)); cos/sin: the
    queries' RoPE (`Attention.indexer_bias`). -> [T, H, d]. Stacked groups (`StepBatch.prefill_stacks`): q, u, c_q
    [G, T, *], keys [G, K, d], entries [G, E, d], index_keys [G, E, dI]; bias, cos, sin, lo, hi shared ->
    [G, T, H, d]."""
    keys = torch.cat([keys, entries.to(keys.dtype)], dim=-2).to(q.dtype)
    entry_bias = attn.indexer_bias(index_keys, u, c_q, cos, sin, lo, hi)
    bias = torch.cat([bias.expand(*entry_bias.shape[:-1], -1), entry_bias], dim=-1)
    return sink_attention(q, keys, bias, attn.attn_sink, attn.head_dim ** -0.5)


def window_attention(attn: "Attention", q: torch.Tensor, keys: torch.Tensor, ring_pad: torch.Tensor,
                     entries: torch.Tensor, entry_bias: torch.Tensor) -> torch.Tensor:
    """A banded prefill group's attention (`StepBatch.banded`): queries q [n, H, d] over their window keys
    [w-1+n, d] as a band and their compressed entries [E, d] (entry_bias [n, E]). -> [n, H, d]"""
    return banded_sink_attention(q, keys.to(q.dtype), ring_pad, entries.to(q.dtype), entry_bias, attn.attn_sink,
                                 attn.head_dim ** -0.5, attn.window)


def indexed_window_attention(attn: "Attention", q: torch.Tensor, keys: torch.Tensor, ring_pad: torch.Tensor,
                             entries: torch.Tensor, index_keys: torch.Tensor, u: torch.Tensor, c_q: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`window_attention` where the lightning indexer keeps the top-k of a CSA group's entries ([lo_t, hi_t) each)."""
    return window_attention(attn, q, keys, ring_pad, entries, attn.indexer_bias(index_keys, u, c_q, cos, sin, lo, hi))


def compressor_emit(comp: "Compressor", inv_freq: torch.Tensor, u: torch.Tensor, positions: torch.Tensor,
                    ring_kv: torch.Tensor, ring_gate: torch.Tensor, rows: torch.Tensor, prev_rows: torch.Tensor,
                    has_prev: torch.Tensor, entry_positions: torch.Tensor):
    """A compressor's work in a `StepBatch` step before its writes: the raw rows of the step's tokens u [N, D] at
    `positions` (kv, and gate with ape, [N, coff*dim]) and the entries [W, dim] of the W windows closing in it,
    pooled and RoPE'd. ring_kv / ring_gate: the rings flattened, [slots*R, coff*dim] (a view: marking a dimension
    symbolic marks the tensor passed, and the rings themselves are inputs of the decode step's graph, which would
    then recompile); rows / prev_rows [W, m] index the rings' rows, then the new ones (`EmitLayout`)."""
    kv_new, gate_new = comp.project(u, positions)
    src_kv = torch.cat([ring_kv, kv_new])                                   # [slots*R + N, coff*dim]
    src_gate = torch.cat([ring_gate, gate_new])
    prev_kv = src_kv[prev_rows][..., :comp.dim] if comp.overlap else None
    prev_gate = src_gate[prev_rows][..., :comp.dim] if comp.overlap else None
    pooled = comp.pool(src_kv[rows], src_gate[rows], prev_kv, prev_gate, has_prev)
    cos, sin = rope_cos_sin(entry_positions, inv_freq)
    return kv_new, gate_new, apply_rope(pooled, cos, sin)


def layer_until_exchange(block: "Block", cache: LayerCache, x: torch.Tensor, batch: DecodeBatch):
    """An expert-parallel router's fixed-shape layer up to its exchange: attention, the way into the MoE sublayer,
    gate and shared expert. -> (x, u, routing weights, expert ids, shared expert output, post, comb)."""
    (u, c_q, q, kv, cos, sin), post, comb = attn_enter(block, x, batch.positions)
    o = block.attn.attend(u, c_q, q, kv, batch.positions, (cos, sin), batch, cache)
    x = attn_leave(block, x, o, cos, sin, post, comb)
    u, post, comb = block.enter("ffn", x)
    weights, idx = block.ffn.gate(u, batch.token_ids)
    return x, u, weights, idx, block.ffn.shared(u), post, comb


def layer_after_exchange(x: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor, post: torch.Tensor,
                         comb: torch.Tensor) -> torch.Tensor:
    """The rest of the layer once the exchange returned the routed experts' sum: MoE combine, mHC expansion."""
    return hc_expand(x, MoE.combine(routed, shared, x.dtype), post, comb)


def ffn_sublayer(block: "Block", x: torch.Tensor, token_ids: torch.Tensor, static: bool) -> torch.Tensor:
    """The whole MoE sublayer on the streams x [N, n, D] (`MoE.forward`'s static: a fixed-shape step's call)."""
    u, post, comb = block.enter("ffn", x, not static)
    return hc_expand(x, block.ffn(u, token_ids, static), post, comb)


EAGER_REGIONS = StepRegions()


# ---- attention ------------------------------------------------------------------------------------------

class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry: softmax(gate + ape) over the window's slots, per channel.

    CSA (`overlap`): each entry pools 2*ratio slots — the previous window's first-half channels and the
    current window's second-half channels. HCA: the window's own `ratio` tokens."""

    def __init__(self, cfg: V4Config, dim: int, ratio: int, overlap: bool):
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        coff = 2 if overlap else 1
        self.wkv = Linear(cfg.hidden_size, coff * dim, fp32=True)
        self.wgate = Linear(cfg.hidden_size, coff * dim, fp32=True)
        self.register_buffer("ape", _meta(ratio, coff * dim))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)

    def project(self, u: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [T, D] at `positions` -> per-token kv and gate (ape of its slot in its window added) [T, coff*dim]
        (fp32): the raw rows a window pools."""
        return self.wkv(u), self.wgate(u) + self.ape[positions % self.ratio]

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv: torch.Tensor | None = None,
             prev_gate: torch.Tensor | None = None, has_prev: torch.Tensor | None = None) -> torch.Tensor:
        """kv, gate [W, ratio, coff*dim] of W complete windows (gate includes ape) -> [W, dim] normalised.

        CSA only: prev_kv / prev_gate [W, ratio, dim] are the first-half channels of the window before each
        one, used where has_prev [W] (the first window of a sequence has none: gate -inf, weight 0)."""
        W, m, d = kv.shape[0], self.ratio, self.dim
        if not self.overlap:
            return self.norm(compress_pool(kv, gate))
        if has_prev is None:  # no window has a predecessor: its slots are empty (kv 0, gate -inf)
            prev_kv, prev_gate = kv.new_zeros(W, m, d), gate.new_full((W, m, d), float("-inf"))
        else:  # selected, not masked-indexed: the shapes stay fixed and the device is never asked for a count
            keep = has_prev[:, None, None]
            prev_kv = torch.where(keep, prev_kv, 0.0)
            prev_gate = torch.where(keep, prev_gate, float("-inf"))
        slot_kv = torch.cat([prev_kv, kv[..., d:]], dim=1)                  # [W, 2m, d]
        slot_gate = torch.cat([prev_gate, gate[..., d:]], dim=1)
        return self.norm(compress_pool(slot_kv, slot_gate))


class Indexer(nn.Module):
    """Lightning Indexer: its own CSA compressor at index_head_dim, scored against queries built from the
    attention's normalised q-lora latent."""

    def __init__(self, cfg: V4Config, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads, fp32=True)
        self.compressor = Compressor(cfg, cfg.index_head_dim, ratio, overlap=True)


@dataclass
class FreshEntries:
    """Compressed entries pooled in a fixed-shape decode step, one per row, before they are written: row t's entry
    number `index[t]` (-1 where its window does not close with this token) and pool place (block, offset: the
    scratch block for -1); `main` / `index_key` the attention entry and indexer key, in the pools' storage form."""

    index: torch.Tensor
    block: torch.Tensor
    offset: torch.Tensor
    main: torch.Tensor
    index_key: torch.Tensor | None = None

    def substitute(self, stored: torch.Tensor, entry: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """stored [n, E, *] gathered from a pool (a copy: it is updated in place), entry [n, E] the entry number of
        each column (None: column e holds entry e) -> the same with row t's fresh value where entry == index[t].
        One [n, *] write, not a pass over [n, E, *]: E is every entry place of the block table (thousands at long
        context); with entry None not even a search over [n, E]."""
        rows = torch.arange(stored.shape[0], device=stored.device)
        if entry is None:
            hit = (self.index >= 0) & (self.index < stored.shape[1])
            col = self.index.clamp(0, stored.shape[1] - 1)
        else:
            hits = (entry == self.index[:, None]) & (self.index[:, None] >= 0)   # [n, E], at most one per row
            hit, col = hits.any(1), hits.to(torch.int32).argmax(1)                # that column (0 where none)
        stored[rows, col] = torch.where(hit.view(-1, *[1] * (stored.dim() - 2)), value, stored[rows, col])
        return stored


class Attention(nn.Module):
    regions = EAGER_REGIONS  # the StepBatch path's pieces (V4Model.use_regions)

    def __init__(self, cfg: V4Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.kind, self.ratio = cfg.layer_types[layer], cfg.compress_ratios[layer]
        H, d = cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.window = H, d, cfg.sliding_window
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, H * d)
        self.wkv = Linear(cfg.hidden_size, d)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # the kv norm
        self.wo_a = Linear(H * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)
        self.register_buffer("attn_sink", _meta(H))
        self.compressor = Compressor(cfg, d, self.ratio, overlap=self.kind == CSA) if self.kind != SWA else None
        self.indexer = Indexer(cfg, self.ratio) if self.kind == CSA else None
        theta = cfg.rope_theta if self.kind == SWA else cfg.compress_rope_theta
        yarn = None if self.kind == SWA else cfg.yarn
        self.register_buffer("inv_freq", yarn_inv_freq(cfg.qk_rope_head_dim, theta, yarn), persistent=False)

    def attend(self, u, c_q, q, kv, positions, rope: tuple[torch.Tensor, torch.Tensor], step: "StepBatch | None",
               cache: "LayerCache | None") -> torch.Tensor:
        """The attention of the projected queries (`project`; `output` takes it on) -> [N, H, d], RoPE still applied.
        rope: the queries' (cos, sin) from `project`, which the CSA indexer's queries rotate by too.
        Without `step`: the full causal forward of one sequence (positions 0..N-1), recomputing everything — the
        plain reference. With a `StepBatch`: N is the concatenation of each sequence's chunk of new tokens, which
        read and extend their cached state in `cache` (paged prefill and decode). With a `DecodeBatch`: the
        fixed-shape decode step."""
        if step is None:
            return self._attend(q, kv, positions, self._full_entries(u, c_q, positions, rope), positions)
        if isinstance(step, DecodeBatch):
            return self._attend_static(u, c_q, q, kv, positions, rope, step, cache)
        return self._attend_cached(u, c_q, q, kv, positions, rope, step, cache)

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Inverse RoPE, grouped low-rank output projection: o [N, H, d] -> [N, D]."""
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        G = self.cfg.o_groups
        wo_a = self.wo_a.weight if self.wo_a.fmt is None else self.wo_a.qweight().dequantize(o.dtype)
        z = torch.einsum("tgi,goi->tgo", o.reshape(o.shape[0], G, -1), wo_a.view(G, -1, wo_a.shape[-1]))
        return self.wo_b(z.flatten(1))

    def project(self, u: torch.Tensor, positions: torch.Tensor):
        """u [N, D] -> c_q [N, q_lora], q [N, H, d], kv [N, d] (normed, RoPE applied), cos, sin."""
        N, H, d = u.shape[0], self.n_heads, self.head_dim
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        c_q = self.q_norm(self.wq_a(u))                                     # [N, q_lora]
        q = unweighted_rms(self.wq_b(c_q).view(N, H, d), self.cfg.rms_norm_eps)
        q = apply_rope(q, cos[:, None], sin[:, None])                       # [N, H, d]
        kv = apply_rope(self.norm(self.wkv(u)), cos, sin)                   # [N, d]
        return c_q, q, kv, cos, sin

    def _attend(self, q: torch.Tensor, window_kv: torch.Tensor, window_pos: torch.Tensor,
                compressed: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor) -> torch.Tensor:
        """Queries q [T, H, d] at `positions` over the sliding-window keys (K=V vectors at `window_pos`; the
        last `window` including self are visible) and optional compressed entries with their bias."""
        rel = window_pos[None, :] - positions[:, None]                      # key - query
        hidden = (rel > 0) | (rel <= -self.window)
        bias = torch.zeros(rel.shape, device=q.device).masked_fill(hidden, float("-inf"))
        keys = window_kv
        if compressed is not None:
            entries, entry_bias = compressed
            keys = torch.cat([window_kv, entries.to(window_kv.dtype)])
            bias = torch.cat([bias, entry_bias], dim=1)
        return sink_attention(q, keys, bias, self.attn_sink, self.head_dim ** -0.5)

    def _entry_bias(self, entries: torch.Tensor, index_keys: torch.Tensor | None, u: torch.Tensor,
                    c_q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lo: torch.Tensor, hi: torch.Tensor,
                    all_visible: torch.Tensor):
        """Per-query bias over the entries (0 = attend, -inf = not): query t may use entries [lo_t, hi_t) —
        its sequence's closed windows. HCA attends to all of them (`all_visible`); CSA to the indexer's top-k."""
        if self.indexer is None:
            return entries, all_visible
        return entries, self.indexer_bias(index_keys, u, c_q, *rope, lo, hi)

    def indexer_bias(self, index_keys: torch.Tensor, u: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """CSA: the bias [T, C] over C entries (their index keys [C, dI]) that keeps the lightning indexer's top-k of
        each query's entries [lo_t, hi_t). Stacked groups: u, c_q [G, T, *] and index_keys [G, C, dI] -> [G, T, C].

        cos/sin [T, r/2]: the queries' RoPE, as `project` computed it outside the compiled prefill regions: derived
        inside one, inductor fused them into the rotation and evaluated them again for every group and head (16 x 32
        times over at 32 prompts of 128 tokens; 5.5 ms of a CSA layer's region)."""
        lead, C = c_q.shape[:-1], index_keys.shape[-2]
        ix = self.indexer
        iq = apply_rope(ix.wq_b(c_q).view(*lead, ix.n_heads, ix.head_dim), cos[:, None], sin[:, None])
        w = ix.weights_proj(u) * ix.n_heads ** -0.5                         # [(G,) T, h]
        top = indexer_topk(iq, index_keys, w, lo, hi, ix.topk)              # [(G,) T, k], -1 = none
        bias = torch.full((*lead, C + 1), float("-inf"), device=u.device)
        bias.scatter_(-1, torch.where(top >= 0, top, C), 0.0)
        return bias[..., :C]

    # -- full reference path ----------------------------------------------------------------------------------
    def _full_entries(self, u: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor,
                      rope: tuple[torch.Tensor, torch.Tensor]):
        if self.compressor is None:
            return None
        entries = self._compress_all(self.compressor, u)                    # [C, d]
        ikeys = self._compress_all(self.indexer.compressor, u) if self.indexer is not None else None
        hi = (positions + 1) // self.ratio                                  # entries query t may see
        hidden = torch.arange(entries.shape[0], device=u.device)[None, :] >= hi[:, None]
        all_visible = torch.zeros(hidden.shape, device=u.device).masked_fill(hidden, float("-inf"))
        return self._entry_bias(entries, ikeys, u, c_q, rope, torch.zeros_like(hi), hi, all_visible)

    def _compress_all(self, comp: Compressor, u: torch.Tensor) -> torch.Tensor:
        m = comp.ratio
        W = u.shape[0] // m
        if W == 0:
            return torch.zeros(0, comp.dim, device=u.device)
        kv, gate = comp.project(u[: W * m], torch.arange(W * m, device=u.device))
        kv, gate = kv.view(W, m, -1), gate.view(W, m, -1)
        prev_kv = torch.cat([kv[:1], kv[:-1]])[..., :comp.dim]             # window j-1 for j >= 1
        prev_gate = torch.cat([gate[:1], gate[:-1]])[..., :comp.dim]
        windows = torch.arange(W, device=u.device)
        pooled = comp.pool(kv, gate, prev_kv, prev_gate, windows >= 1)      # [W, dim]
        cos, sin = rope_cos_sin(windows * m, self.inv_freq)                 # entry j at position j*m
        return apply_rope(pooled, cos, sin)

    # -- cached (paged) path ----------------------------------------------------------------------------------
    def _attend_cached(self, u, c_q, q, kv, positions, rope, step: StepBatch, lc: LayerCache) -> torch.Tensor:
        """All chunks of the step in one attention call: every query row sees its own sequence's window keys
        (ring rows, then this step's rows) and its own closed-window entries (bias -inf elsewhere)."""
        self._emit_closing(u, positions, step, lc)     # the entries of windows closing in this step first
        out = torch.empty_like(q)
        cos, sin = rope
        if step.decode_group:
            dec = step.decode_tables(step.decode_group)
            r = dec.rows
            out[r] = self._attend_decode(u[r], c_q[r], q[r], kv[r], positions[r], (cos[r], sin[r]), lc, dec.slots,
                                         dec.block_tables)
        for stack in step.prefill_stacks:
            if len(stack) > 1:
                self._attend_stack(u, c_q, q, kv, rope, step, stack, lc, out)
                continue
            group = stack[0]
            win = step.window_layout(self.window, group)
            r = win.rows
            ring = lc.read_main(lc.swa, win.ring_slots, win.ring_rows, kv.dtype)
            if win.bias is None:  # one long chunk: its window as a band (StepBatch.banded)
                out[r] = self._attend_banded(u[r], c_q[r], q[r], ring, kv[r], win.ring_pad, (cos[r], sin[r]), step,
                                             group, lc)
                continue
            keys, bias = torch.cat([ring, kv[r]]), win.bias
            if self.compressor is not None:
                ent = step.entry_layout(self.ratio, group)
                entries = lc.read_main(lc.entries, ent.blocks, ent.offsets, kv.dtype)   # [E, d]
                entry_bias = ent.bias
                if self.indexer is not None and ent.most > self.indexer.topk:   # the indexer drops some entries
                    ikeys = lc.read_index(ent.blocks, ent.offsets, torch.float32)
                    p = ent.plain_rows                  # leading rows whose entries the top-k keeps all of
                    rs = r[p:]
                    out[rs] = self.regions.indexed_attention(self, q[rs], keys, bias[p:], entries, ikeys, u[rs],
                                                             c_q[rs], cos[rs], sin[rs], ent.lo[p:], ent.hi[p:])
                    if not p:
                        continue
                    r, bias, entry_bias = r[:p], bias[:p], entry_bias[:p]   # the leading rows: as below
                # HCA; or CSA rows that see no more entries than the indexer keeps: its top-k keeps them all
                keys = torch.cat([keys, entries.to(keys.dtype)])
                bias = torch.cat([bias, entry_bias], dim=1)
            out[r] = self.regions.attention(q[r], keys.to(q.dtype), bias, self.attn_sink, self.head_dim ** -0.5)
        self._write_rings(kv, step, lc)                                     # after every read
        return out

    def attend_tail(self, u, c_q, q, kv, positions, rope, step: StepBatch, lc: LayerCache,
                    tail: DecodeTables) -> torch.Tensor:
        """The attention of the logit rows alone, each its chunk's last token (`StepBatch.tail_tables`), for the last
        layer, where no other row's output is read: the step's cache writes for every row (entries of the windows
        closing, window rings), then each logit row reads its window and entries where they now are, as a decode row
        does (`_attend_decode`: the same keys the chunk's own attention would give that row, the same softmax, up
        to fp32 summation order) -> [len(tail.rows), H, d]."""
        self.write_step(u, kv, positions, step, lc)
        r = tail.rows
        cos, sin = rope
        return self._attend_decode(u[r], c_q[r], q[r], kv[r], positions[r], (cos[r], sin[r]), lc, tail.slots,
                                   tail.block_tables)

    def write_step(self, u, kv, positions, step: StepBatch, lc: LayerCache) -> None:
        """The step's cache writes alone (`_emit_closing`, `_write_rings`): for a layer whose attention no row reads."""
        self._emit_closing(u, positions, step, lc)
        self._write_rings(kv, step, lc)

    def _emit_closing(self, u, positions, step: StepBatch, lc: LayerCache) -> None:
        """Pool and write the compressed entries (and CSA's indexer keys) of the windows closing in this step."""
        if self.compressor is not None:
            self._emit(self.compressor, u, positions, step, lambda b, o, x: lc.write_main(lc.entries, b, o, x),
                       lc.state_kv, lc.state_gate)
        if self.indexer is not None:
            self._emit(self.indexer.compressor, u, positions, step, lc.write_index, lc.index_state_kv,
                       lc.index_state_gate)

    def _write_rings(self, kv, step: StepBatch, lc: LayerCache) -> None:
        """Each sequence's newest rows (up to a window) into its window ring."""
        writes = step.ring_writes(self.window)
        lc.write_main(lc.swa, writes.slots, writes.rows, kv[writes.src])

    def _attend_stack(self, u, c_q, q, kv, rope, step: StepBatch, stack: tuple[tuple[int, ...], ...],
                      lc: LayerCache, out: torch.Tensor) -> None:
        """G prefill groups of one chunk each, of the same length n at the same start (`StepBatch.prefill_stacks`),
        as one batched call: each group's queries over its own keys (ring rows, then its own rows; then its entries)
        under the bias they share. Writes their rows of `out`."""
        st = step.stack_layout(self.window, stack)
        take = st.take                                                      # [N, *] -> [G, n, *]
        keys = torch.cat([lc.read_main(lc.swa, st.ring_slots, st.ring_rows, kv.dtype), take(kv)], dim=1)  # [G, P+n, d]
        bias = st.bias
        if self.compressor is not None:
            ent = step.stack_entries(self.ratio, stack)
            entries = lc.read_main(lc.entries, ent.blocks, ent.offsets, kv.dtype)                  # [G, E, d]
            if self.indexer is not None and ent.most > self.indexer.topk:
                ikeys = lc.read_index(ent.blocks, ent.offsets, torch.float32)
                p = ent.plain_rows                      # leading rows whose entries the top-k keeps all of
                qs = take(q)
                # the rows from p on, contiguous (a view's strides would be guards of a graph of its own)
                tail = (lambda t: t[:, p:].contiguous()) if p else (lambda t: t)
                y = self.regions.stacked_indexed_attention(self, tail(qs), keys, bias[p:], entries, ikeys,
                                                           tail(take(u)), tail(take(c_q)),
                                                           *(take(t)[0][p:] for t in rope), ent.lo[p:], ent.hi[p:])
                if p:
                    plain = self.regions.stacked_attention(
                        qs[:, :p].contiguous(), torch.cat([keys, entries.to(keys.dtype)], dim=1).to(q.dtype),
                        torch.cat([bias[:p], ent.bias[:p]], dim=1), self.attn_sink, self.head_dim ** -0.5)
                    y = torch.cat([plain, y], dim=1)
                st.put(out, y)
                return
            keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
            bias = torch.cat([bias, ent.bias], dim=1)
        st.put(out, self.regions.stacked_attention(take(q), keys.to(q.dtype), bias, self.attn_sink,
                                                   self.head_dim ** -0.5))

    def _attend_banded(self, u, c_q, q, ring, kv, ring_pad, rope, step: StepBatch, group: tuple[int, ...],
                       lc: LayerCache) -> torch.Tensor:
        """A prefill group of one chunk (`StepBatch.banded`): its keys, the cached window rows ring [P, d] then its
        own kv [n, d], padded in front to w - 1 + n rows, attended as a band beside the chunk's entries (the indexer's
        top-k of them for CSA where it drops some)."""
        n, d = q.shape[0], kv.shape[1]
        keys = torch.cat([kv.new_zeros(self.window - 1 - ring.shape[0], d), ring, kv])
        tail = None  # the indexed rows' output, after the leading rows that attend without the indexer
        if self.compressor is None:
            entries, bias = keys.new_zeros(0, d), torch.zeros(n, 0, device=keys.device)
        else:
            ent = step.entry_layout(self.ratio, group)
            entries = lc.read_main(lc.entries, ent.blocks, ent.offsets, keys.dtype)
            bias = ent.bias
            if self.indexer is not None and ent.most > self.indexer.topk:
                ikeys = lc.read_index(ent.blocks, ent.offsets, torch.float32)
                p = ent.plain_rows                      # leading rows whose entries the top-k keeps all of
                if min(p, n - p) <= self.window:        # each side more than one block of queries (`warm_up`)
                    p = 0
                tail = self.regions.indexed_window_attention(
                    self, q[p:], keys[p:], (ring_pad - p).clamp(min=0) if p else ring_pad, entries, ikeys, u[p:],
                    c_q[p:], *(t[p:] for t in rope), ent.lo[p:], ent.hi[p:])
                if not p:
                    return tail
                n, q, keys, bias = p, q[:p], keys[:self.window - 1 + p], bias[:p]  # the leading rows: as below
        if entries.shape[0] < 2:  # masked entries make up two: a count of 0 or 1 would be a graph of its own
            pad = 2 - entries.shape[0]
            entries = torch.cat([entries, entries.new_zeros(pad, d)])
            bias = torch.cat([bias, torch.full((n, pad), float("-inf"), device=bias.device)], dim=1)
        y = self.regions.window_attention(self, q, keys, ring_pad, entries, bias)
        return y if tail is None else torch.cat([y, tail])

    def _attend_decode(self, u, c_q, q, kv, positions, rope, lc: LayerCache, slots: torch.Tensor,
                       block_tables: torch.Tensor, fresh: "FreshEntries | None" = None) -> torch.Tensor:
        """Single-token chunks, paged-attention style: each query (row t at positions[t], the count of its sequence's
        cached tokens) reads its own window ring in state slot slots[t] (the ring row of the position falling out
        of the window is the one this token replaces) and its own compressed entries through its block table — the
        indexer's top-k of them for CSA — then attends sparsely. Every shape here is a function of the row count,
        the block tables' width and the config (the fixed-shape step, `DecodeBatch`, relies on it).

        fresh: entries that close with this token and are not yet in the pools (the fixed-shape step writes them
        after every read); they are substituted, in storage form, where a row reads entry `fresh.index`.

        FP8 cache: every key is read as stored, this token's own included (packed as it will be written, which is
        what a write-then-read FP8 attention sees). Where the kernels are Triton's, they take the packed rows and
        dequantize in registers; the torch path unpacks first and is their reference (docs/architecture.md §11)."""
        w, dev = self.window, q.device
        n = q.shape[0]
        ring_rows = torch.arange(w, device=dev)[None, :]
        now = (torch.arange(n, device=dev), positions % w)
        fp8 = lc.fmt == "fp8"
        in_registers = fp8 and kernel_backend(dev) == "triton"
        if fp8:
            ring = lc.swa[slots[:, None], ring_rows]                                              # [n, w, bytes]
            ring[now] = pack_main(kv, lc.rope_dim)
            if not in_registers:
                ring = unpack_main(ring, lc.head_dim, lc.rope_dim, kv.dtype)
        else:
            ring = lc.read_main(lc.swa, slots[:, None], ring_rows, kv.dtype)                      # [n, w, d]
            ring[now] = kv
        keys = [ring]
        valid = [ring_rows <= positions[:, None]]                       # rows not yet written are empty
        if self.compressor is not None:
            per_block = lc.entries.shape[1]                                 # entries per token block
            count = (positions + 1) // self.ratio                                                  # [n]
            width = block_tables.shape[1] * per_block
            slot = torch.arange(width, device=dev)[None, :]
            ok = slot < count[:, None]
            blocks = block_tables.repeat_interleave(per_block, dim=1)                             # [n, width]
            offsets = (slot % per_block).expand(n, -1)
            entry = None                                                    # column e holds entry e
            if self.indexer is not None and width:
                ix = self.indexer
                cos, sin = rope
                iq = apply_rope(ix.wq_b(c_q).view(n, ix.n_heads, ix.head_dim), cos[:, None], sin[:, None])
                wts = ix.weights_proj(u) * ix.n_heads ** -0.5
                # the keys read in place through the block tables: the Triton kernel's paged form, on the CPU's
                # torch backend kernels/paged_cpu.py; the torch reference elsewhere (and FP8 keys on it) gathers them
                if kernel_backend(dev) == "triton" or (not fp8 and dev.type == "cpu"):
                    top = indexer_topk_paged(iq, lc.index_keys, block_tables, wts, ok, ix.topk,
                                             *((fresh.index, fresh.index_key) if fresh is not None else ()))
                else:
                    stored = lc.index_keys[block_tables].flatten(1, 2)         # [n, width, *]: whole blocks
                    if fresh is not None:
                        stored = fresh.substitute(stored, entry, fresh.index_key)
                    top = indexer_topk_padded(iq, lc.load_index(stored, torch.float32), wts, ok, ix.topk)  # [n, k]
                ok = top >= 0
                blocks, offsets = blocks.gather(1, top.clamp(min=0)), offsets.gather(1, top.clamp(min=0))
                entry = top
            if ok.shape[1]:
                stored = lc.entries[blocks, offsets]
                if fresh is not None:
                    stored = fresh.substitute(stored, entry, fresh.main)
                keys.append(stored if in_registers else lc.load_main(stored, kv.dtype))
                valid.append(ok)
        keys_t, valid_t = torch.cat(keys, dim=1), torch.cat(valid, dim=1)
        bias = torch.zeros(valid_t.shape, device=dev).masked_fill(~valid_t, float("-inf"))
        scale = self.head_dim ** -0.5
        if in_registers:
            return sparse_sink_attention_fp8(q, keys_t, bias, self.attn_sink, scale, self.head_dim, lc.rope_dim)
        return sparse_sink_attention(q, keys_t.to(q.dtype), bias, self.attn_sink, scale)

    # -- fixed-shape decode (DecodeBatch) ---------------------------------------------------------------------
    def _attend_static(self, u, c_q, q, kv, positions, rope, d: DecodeBatch, lc: LayerCache) -> torch.Tensor:
        """The decode step as a function of fixed shapes: every row (padding included) pools its open window and
        attends; writes that have no place (padding rows, windows not closing yet) go to the scratch slot or block
        instead of being skipped, so no shape depends on the data. Every pool is read before it is written: an
        entry closing now is substituted into what this layer reads, and the writes go through `DecodeBatch.put`."""
        fresh = None
        if self.compressor is not None:
            index, block, offset, main = self._pool_static(self.compressor, u, positions, d, "state_kv", "state_gate",
                                                           lc)
            fresh = FreshEntries(index, block, offset, lc.store_main(main, lc.entries))
        if self.indexer is not None:  # the same windows close, at the same places
            *_, key = self._pool_static(self.indexer.compressor, u, positions, d, "index_state_kv",
                                        "index_state_gate", lc)
            fresh.index_key = lc.store_index(key)
        out = self._attend_decode(u, c_q, q, kv, positions, rope, lc, d.slots, d.block_tables, fresh)
        if fresh is not None:
            d.put(self.layer, "entries", (fresh.block, fresh.offset), fresh.main)
            if self.indexer is not None:
                d.put(self.layer, "index_keys", (fresh.block, fresh.offset), fresh.index_key)
        d.put(self.layer, "swa", (d.slots, positions % self.window), lc.store_main(kv, lc.swa))
        return out

    def _pool_static(self, comp: Compressor, u: torch.Tensor, positions: torch.Tensor, d: DecodeBatch,
                     kv_ring: str, gate_ring: str, lc: LayerCache):
        """`_emit` for one token per row, in fixed shapes: every row pools the window its token falls in (the
        token's raw row taking its place among the ring rows read) and the token's raw row enters the compressor
        ring. -> (entry number or -1, block, offset, pooled RoPE'd entry) per row: its pool place where the window
        closes with this token, the scratch block for every other row.

        With `d.pool_on_close`, an HCA layer pools only in steps where some row's window closes (`torch.cond` on that
        flag; the other steps' pooled rows are never read): its window is 128 rows, each pooled with a softmax, and
        it closes once in 128 tokens. CSA's windows of 4 close in nearly every step of a batch: no cond there."""
        ring_kv, ring_gate = getattr(lc, kv_ring), getattr(lc, gate_ring)
        m, R, dim = comp.ratio, ring_kv.shape[1], comp.dim
        kv_new, gate_new = comp.project(u, positions)
        j = positions // m                                                  # the window of each row's token
        closing = ((positions + 1) % m == 0) & (d.real != 0)

        def pool(ring_kv, ring_gate, slots, j, own, kv_new, gate_new):
            """Every row's window, its own raw row in place -> [B, dim] pooled (not yet RoPE'd)."""
            col, ring_rows = slots[:, None], torch.arange(m, device=slots.device)
            if R == m:  # HCA: the ring is the window, in order (a slice per row: no per-element ring index)
                rows = ring_rows[None, :]
                win_kv, win_gate = ring_kv[slots], ring_gate[slots]
            else:
                rows = (j[:, None] * m + ring_rows) % R                     # [B, m] its ring rows
                win_kv, win_gate = ring_kv[col, rows], ring_gate[col, rows]
            mine = (rows == own[:, None])[..., None]                        # the token's own row
            win_kv = torch.where(mine, kv_new[:, None], win_kv)
            win_gate = torch.where(mine, gate_new[:, None], win_gate)
            prev_kv = prev_gate = has_prev = None
            if comp.overlap:                                                # window j - 1: all in the ring
                prev = (rows - m) % R
                prev_kv, prev_gate, has_prev = ring_kv[col, prev][..., :dim], ring_gate[col, prev][..., :dim], j >= 1
            return comp.pool(win_kv, win_gate, prev_kv, prev_gate, has_prev)

        def idle(ring_kv, ring_gate, slots, j, own, kv_new, gate_new):
            return kv_new.new_zeros(kv_new.shape[0], dim)

        args = (ring_kv, ring_gate, d.slots, j, positions % R, kv_new, gate_new)
        if d.pool_on_close and R == m:  # the HCA window's pool only in a step where some row's window closes
            pooled = torch.cond(closing.any(), pool, idle, args)
        else:
            pooled = pool(*args)
        ring = (d.slots, positions % R)                                     # after the reads above
        d.put(self.layer, kv_ring, ring, kv_new)
        d.put(self.layer, gate_ring, ring, gate_new)
        cos, sin = rope_cos_sin(j * m, self.inv_freq)
        per_block = d.cache.block_size // m
        block = torch.where(closing, d.block_tables.gather(1, (j // per_block)[:, None])[:, 0], d.cache.scratch_block)
        return torch.where(closing, j, -1), block, j % per_block, apply_rope(pooled, cos, sin)

    def _emit(self, comp: Compressor, u: torch.Tensor, positions: torch.Tensor, step: StepBatch,
              write, ring_kv: torch.Tensor, ring_gate: torch.Tensor) -> None:
        """Pool every window that closes within this step into `pool`, then keep the newest raw rows of each
        sequence in its compressor ring (which covers the open window and, for CSA, the previous one)."""
        m, R = comp.ratio, ring_kv.shape[1]
        lay = step.emit_layout(m, R, comp.overlap)
        W = lay.positions.numel()
        if W:
            kv_new, gate_new, entries = self.regions.emit_for(u.shape[0], W)(
                comp, self.inv_freq, u, positions, ring_kv.flatten(0, 1), ring_gate.flatten(0, 1), lay.rows,
                lay.prev_rows, lay.has_prev, lay.positions)
            write(lay.blocks, lay.offsets, entries)
        else:
            kv_new, gate_new = comp.project(u, positions)
        w = lay.writes
        ring_kv[w.slots, w.rows] = kv_new[w.src]
        ring_gate[w.slots, w.rows] = gate_new[w.src]


# ---- MoE ------------------------------------------------------------------------------------------------

class Expert(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter), Linear(inter, dim), Linear(dim, inter)


class Gate(nn.Module):
    """Routing: sqrtsoftplus scores; top-k of score + correction bias, or tid2eid[token] in hash layers."""

    def __init__(self, cfg: V4Config, hash_layer: bool):
        super().__init__()
        self.cfg, self.hash = cfg, hash_layer
        self.weight_lin = Linear(cfg.hidden_size, cfg.n_routed_experts, fp32=True)
        if hash_layer:
            self.register_buffer("tid2eid", _meta(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.register_buffer("bias", _meta(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], token_ids [N] -> weights [N, K] (fp32), expert ids [N, K]."""
        scores = F.softplus(self.weight_lin(x)).sqrt()                      # [N, E] fp32
        if self.hash:
            idx = self.tid2eid[token_ids]
        else:
            idx = torch.topk(scores + self.bias, self.cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.cfg.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.cfg.routed_scaling_factor, idx


class ExpertBackend(Protocol):
    """Where a MoE layer's routed experts run when they are not in this process (an expert-parallel router's
    all-to-all with the expert shards): rows of one layer in, weighted expert outputs out."""

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
              static: bool = False) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> sum_k weights[:, k] * Expert_{idx[:, k]}(x), [N, D] fp32. static: a
        fixed-shape step's call (fixed-capacity exchange: no host read, no data-dependent shape)."""


def group_rows(idx: torch.Tensor, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch order: a token's K routing slots become N*K rows, sorted stably by `key` (default: the expert id;
    an expert-parallel router sorts by destination rank, then expert). -> (order [N*K], token of each row)."""
    order = torch.argsort(idx.reshape(-1) if key is None else key, stable=True)
    return order, order // idx.shape[1]


def combine_rows(order: torch.Tensor, y: torch.Tensor, top_k: int) -> torch.Tensor:
    """Combine: each token's top_k weighted expert rows, y [N*top_k, D] in dispatch order `order` (`group_rows`), summed
    back into [N, D] fp32. A gather through the inverse permutation and a sum over each token's k rows in slot order:
    no scatter-add (atomic adds in a compiled CPU graph, unordered on CUDA), and the result does not depend on the
    dispatch order, so a router sorting by shard sums exactly as the single process sorting by expert."""
    slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return y.float()[slot].view(-1, top_k, y.shape[1]).sum(dim=1)




class MoE(nn.Module):
    """gate -> expert compute -> combine; the cut points of expert parallelism."""

    def __init__(self, cfg: V4Config, layer: int, expert_range: tuple[int, int],
                 expert_backend: ExpertBackend | None = None):
        """expert_backend: where the routed experts run; None: this layer's own experts, in this process."""
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = Gate(cfg, cfg.is_hash_layer(layer))
        self.expert_range = expert_range
        self.experts = nn.ModuleDict({str(e): Expert(cfg.hidden_size, cfg.moe_intermediate_size)
                                      for e in range(*expert_range)})
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size)
        self.expert_backend = expert_backend
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see stacked_experts

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E, 2I, D], w2 [E, D, I]) of this layer's routed experts, built once, on first use after loading:
        each expert's w1/w3/w2 buffers then become views of them (one copy of the weights, and loading new
        values in place reaches both). Plain weights only (see `uses_grouped`)."""
        if self._stacked is None:
            I = self.cfg.moe_intermediate_size
            w13, w2 = self._stacked = stack_experts(self.expert_weights())
            for i, e in enumerate(sorted(int(k) for k in self.experts)):
                m = self.experts[str(e)]
                m.w1._buffers["weight"], m.w3._buffers["weight"] = w13[i, :I], w13[i, I:]
                m.w2._buffers["weight"] = w2[i]
        return self._stacked

    def uses_grouped(self, x: torch.Tensor) -> bool:
        """Whether the routed experts run grouped on the device (kernels/moe.py `expert_mlp_grouped`): on the torch
        backend (Triton's grouped kernel is device-side already), with every routed expert here, in plain weights
        (FP8/FP4 kept quantized stay on the per-expert path, which reads the routing back to the host)."""
        E = self.cfg.n_routed_experts
        return (self.expert_backend is None and kernel_backend(x.device) == "torch"
                and self.expert_range == (0, E)
                and (self._stacked is not None
                     or all(m.w1.fmt is None and m.w2.fmt is None and m.w3.fmt is None for m in self.experts.values())))

    def expert_weights(self) -> dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]:
        return {int(e): (m.w1.qweight(), m.w2.qweight(), m.w3.qweight()) for e, m in self.experts.items()}

    def compute_experts(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Rows of (token vector, expert id, routing weight), grouped by expert -> weighted outputs."""
        return expert_mlp(x, expert_idx, weights, self.expert_weights(), self.cfg.swiglu_limit)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared_experts
        return s.w2(swiglu_clamped(s.w1(x), s.w3(x), self.cfg.swiglu_limit))

    def route(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Sum over each token's experts of weight * Expert(x) -> [N, D] fp32: here, or on the backend.
        static: a fixed-shape step (no host read, no data-dependent shape)."""
        if self.expert_backend is not None:
            return self.expert_backend.route(self.layer, x, weights, idx, static)
        order, tok = group_rows(idx)                                        # dispatch: rows grouped by expert
        if self.uses_grouped(x):                                             # on the device: no host read
            w13, w2 = self.stacked_experts()
            ids = idx.reshape(-1)[order]
            # the native CPU kernel in a decode step and eagerly; a compiled prefill region keeps the grouped GEMMs
            y = expert_mlp_grouped(x[tok], expert_offsets(ids, w13.shape[0]), weights.reshape(-1)[order], w13, w2,
                                   self.cfg.swiglu_limit, native=static or not torch.compiler.is_compiling())
            return combine_rows(order, y, idx.shape[1])
        y = self.compute_experts(x[tok], idx.reshape(-1)[order], weights.reshape(-1)[order])
        return combine_rows(order, y, idx.shape[1])

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, static: bool = False) -> torch.Tensor:
        weights, idx = self.gate(x, token_ids)                              # gate
        routed = self.route(x, weights, idx, static)                        # expert compute (local or all-to-all)
        return self.combine(routed, self.shared(x), x.dtype)

    @staticmethod
    def combine(routed: torch.Tensor, shared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Routed experts' sum (fp32) plus the shared expert's output, in the layer's dtype."""
        return (routed + shared.float()).to(dtype)


# ---- block and model ------------------------------------------------------------------------------------

class Block(nn.Module):
    regions = EAGER_REGIONS  # the StepBatch path's pieces (V4Model.use_regions)

    def __init__(self, cfg: V4Config, layer: int, expert_range: tuple[int, int],
                 expert_backend: ExpertBackend | None = None):
        super().__init__()
        self.cfg = cfg
        n, D = cfg.hc_mult, cfg.hidden_size
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn = MoE(cfg, layer, expert_range, expert_backend)
        for site in ("attn", "ffn"):
            self.register_buffer(f"hc_{site}_fn", _meta((2 + n) * n, n * D))
            self.register_buffer(f"hc_{site}_base", _meta((2 + n) * n))
            self.register_buffer(f"hc_{site}_scale", _meta(3))

    def enter(self, site: str, x: torch.Tensor, prefill: bool = False):
        """The way into sublayer `site` ("attn", "ffn"): x [N, n, D] -> (u [N, D], post, comb). prefill: a
        `StepBatch` step's rows (`mhc_weights`)."""
        c, norm = self.cfg, getattr(self, f"{site}_norm")
        return hc_enter(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                        getattr(self, f"hc_{site}_scale"), norm.weight, c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters,
                        prefill)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor,
                step: StepBatch | None = None, cache: LayerCache | None = None,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, n, D] residual streams of N tokens (one whole sequence, or a step's chunks). out_rows: the rows
        whose output is wanted (`V4Model.step`'s last layer): every row still writes the cache, only these leave the
        attention and run the MoE sublayer -> [len(out_rows), n, D]."""
        fns = self.regions if isinstance(step, StepBatch) else EAGER_REGIONS
        (u, c_q, q, kv, cos, sin), post, comb = fns.attn_enter(self, x, positions, isinstance(step, StepBatch))
        if out_rows is not None and not out_rows.numel():   # no row's logits wanted: the cache writes alone
            self.attn.write_step(u, kv, positions, step, cache)
            return x[:0]
        tail = step.tail_tables() if out_rows is not None else None
        if tail is not None:   # the logit rows are chunks' last tokens: only they attend, after the cache writes
            o = self.attn.attend_tail(u, c_q, q, kv, positions, (cos, sin), step, cache, tail)
        else:
            o = self.attn.attend(u, c_q, q, kv, positions, (cos, sin), step, cache)
        if out_rows is not None:
            x, cos, sin, post, comb, token_ids = (t[out_rows] for t in (x, cos, sin, post, comb, token_ids))
            o = o if tail is not None else o[out_rows]
        x = fns.attn_leave(self, x, o, cos, sin, post, comb)
        return fns.ffn_for(self, x)(self, x, token_ids, isinstance(step, DecodeBatch))


class V4Model(nn.Module):
    """DeepSeek-V4 decoder (no MTP). Build on the meta device, then `load_state(...)` from a checkpoint."""

    def __init__(self, cfg: V4Config, dtype: torch.dtype = torch.float32, expert_range: tuple[int, int] | None = None,
                 expert_backend: ExpertBackend | None = None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        n, D = cfg.hc_mult, cfg.hidden_size
        self.expert_range = expert_range or (0, cfg.n_routed_experts)
        self.register_buffer("embed_weight", _meta(cfg.vocab_size, D))
        self.layers = nn.ModuleList(Block(cfg, i, self.expert_range, expert_backend)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = Linear(D, cfg.vocab_size, fp32=True)
        self.register_buffer("hc_head_fn", _meta(n, n * D))
        self.register_buffer("hc_head_base", _meta(n))
        self.register_buffer("hc_head_scale", _meta(1))

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward of one sequence without cache. token_ids [T] -> logits [T, V] (fp32)."""
        positions = torch.arange(token_ids.shape[0], device=token_ids.device)
        x = self._embed(token_ids)
        for block in self.layers:
            x = block(x, positions, token_ids)
        return self.logits(x)

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    regions = EAGER_REGIONS

    def use_regions(self, regions: StepRegions) -> None:
        """The pieces the variable-shape (`StepBatch`) step runs its mHC and prefill attention with."""
        self.regions = regions
        for block in self.layers:
            block.regions = block.attn.regions = regions

    @property
    def experts_remote(self) -> bool:
        """Routed experts run elsewhere (an expert-parallel router: every MoE layer is an exchange with every rank,
        once per step, in lockstep)."""
        return any(block.ffn.expert_backend is not None for block in self.layers)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [N] -> the n residual streams [N, n, D], each the token's embedding."""
        x = F.embedding(token_ids, self.embed_weight).to(self.dtype)
        return x[:, None, :].expand(-1, self.cfg.hc_mult, -1).contiguous()

    @torch.no_grad()
    def step(self, token_ids, batch: StepBatch, logit_rows=None) -> torch.Tensor:
        """Prefill and/or decode through the paged cache: token_ids [N] (a tensor or list) are the chunks of
        `batch`, concatenated; logit_rows (default: each chunk's last token) the rows whose logits are returned.

        The step's index layouts, token ids and rows reach the device in one copy (`StepBatch.prepare`). Returns
        logits [len(logit_rows), V] fp32 on the model's device and advances each sequence's cached token count."""
        if len(token_ids) != batch.num_tokens:
            raise ValueError(f"token_ids has {len(token_ids)} tokens, the batch's chunks {batch.num_tokens}")
        token_ids, rows = batch.prepare(token_ids, logit_rows)
        positions = batch.positions()
        x = self._embed(token_ids)
        # The last layer's rows past its cache writes are read by the logits alone: only the logit rows go on (a
        # prefill of 32 prompts of 128 tokens: 32 rows of 4096 through its attention's output and MoE;
        # docs/architecture.md §12)
        last = len(self.layers) - 1 if rows.numel() < len(token_ids) else None
        for i, (block, layer_cache) in enumerate(zip(self.layers, batch.cache.layers)):
            x = block(x, positions, token_ids, batch, layer_cache, rows if i == last else None)
        for seq, _, n in batch.chunks:
            seq.num_tokens += n
        return self.logits(x if last is not None else x[rows])

    @torch.no_grad()
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One decode step in fixed shapes (`DecodeBatch`): a function of device tensors only — no host read, no
        shape that depends on the data — so it compiles with `fullgraph=True` and captures as a CUDA graph.
        -> logits [B, V] fp32, padding rows included. The caller advances each sequence's cached token count."""
        x = self._embed(batch.token_ids)
        for block, layer_cache in zip(self.layers, batch.cache.layers):
            x = block(x, batch.positions, batch.token_ids, batch, layer_cache)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hc_head -> final norm -> LM head (fp32). x [T, n, D] -> [T, V]."""
        c = self.cfg
        flat = x.flatten(1).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + c.rms_norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_head_fn) * self.hc_head_scale + self.hc_head_base) + c.hc_eps
        return self.head(self.norm(hc_collapse(x, pre)))


def checkpoint_name(module_name: str) -> str:
    """Module buffer name -> official checkpoint tensor name (the few places nn naming differs)."""
    if module_name == "embed_weight":
        return "embed.weight"
    return module_name.replace(".gate.weight_lin.weight", ".gate.weight")
