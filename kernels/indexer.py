"""Lightning Indexer scoring and causal top-k (docs/v4_model.md §2.4).

I_{t,j} = sum_h w_{t,h} * ReLU(q_{t,h} . k_j) * d_I^-1/2; query t may select entries j in [lo_t, hi_t) (its own
sequence's closed windows in a batch of several sequences); top-k over those, -1 where fewer than k are visible. Exactly equal scores (e.g. every head's ReLU
at zero) resolve to the lower entry index, so a query selects the same entries however many future entries
its row holds (full prefill vs. incremental decode).

Triton path: the scores I_{t,j} come from one kernel (a program per query row and block of entries: all index
heads in one [h, dI] x [dI, entries] dot, ReLU, head weights, sum over heads, -inf outside the row's selectable
entries); the top-k is then torch's stable descending sort over those scores, the same selection code as the
reference, so the lower-index tie rule holds exactly (exact ties are exact zeros in both paths).

FP8 cache (`indexer_topk_padded_fp8`): the scoring kernel reads the gathered keys as packed bytes (kernels/kv_fp8.py:
e4m3 dims and one fp32 scale) and dequantizes them in registers; its reference unpacks them to fp32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import kernel_backend, launch, record_triton_call
from .kv_fp8 import index_entry_bytes, unpack_index_ref
from .paged_cpu import index_scores, paged_index_scores


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest fp32 scores of each row [n, E], best first, ties to the earliest column: what a
    stable descending sort gives. A top-k over one int64 key per column — the score's order-preserving integer
    image above, the reversed column below — which is unique, so the partial selection (O(E)) picks exactly the
    sort's columns (O(E log E); 6x slower at 8K candidates on the CPU). -0.0 counts as +0.0, as in the sort."""
    scores = scores.float()
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)
    bits = scores.view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()               # float order as signed integer order
    E = scores.shape[-1]
    key = (ordered << 32) | (E - 1 - torch.arange(E, device=scores.device))
    return key.topk(k, dim=-1).indices


def indexer_topk_ref(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, topk: int) -> torch.Tensor:
    """q [T, h, dI], keys [C, dI], weights [T, h] (already scaled by h^-1/2), lo/hi [T] -> indices
    [T, min(topk, C)] into keys (int64, -1 = no entry: fewer than topk selectable). Stacked (torch only): q
    [G, T, h, dI], keys [G, C, dI], weights [G, T, h], each group over its own keys, lo/hi shared -> [G, T, k]."""
    C = keys.shape[-2]
    k = min(topk, C)
    if C == 0:
        return torch.empty(*q.shape[:-2], 0, dtype=torch.long, device=q.device)
    scores = torch.einsum("...thd,...cd->...thc", q.float(), keys.float()).relu() * (q.shape[-1] ** -0.5)
    scores = (scores * weights.float()[..., None]).sum(dim=-2)  # [..., T, C]
    j = torch.arange(C, device=q.device)[None, :]
    outside = (j < lo[:, None]) | (j >= hi[:, None])
    scores = scores.masked_fill(outside, float("-inf"))
    idx = stable_topk(scores, k)
    invalid = (idx < lo[:, None]) | (idx >= hi[:, None])
    return torch.where(invalid, torch.full_like(idx, -1), idx)


def indexer_launch_settings(NH: int, DI: int) -> dict:
    """Block sizes and warps of `_indexer_scores_kernel` (the only place they are chosen; kernels/aot.py compiles
    what the wrappers launch with them and checks that none spills registers)."""
    # the fp32 [heads, dI] query tile and [BLOCK_C, dI] key tile share the registers (the dot runs on FMA units):
    # at 64 heads, 64 keys per program spilled on sm_90a and sm_100a, 32 on sm_100a; 16 over 8 warps use ~75
    return dict(BLOCK_H=max(16, triton.next_power_of_2(NH)), BLOCK_C=16, BLOCK_D=max(16, triton.next_power_of_2(DI)),
                num_warps=8)


@triton.jit
def _indexer_scores_kernel(q_ptr, k_ptr, w_ptr, lo_ptr, hi_ptr, valid_ptr, tab_ptr, out_ptr, NH, C, DI, head_scale,
                           stride_qt, stride_qh, stride_kt, stride_kc, stride_wt, stride_vt, stride_ot,
                           stride_tt, stride_kb, ENTRIES,
                           HAS_VALID: tl.constexpr, KEYS_FP8: tl.constexpr, PAGED: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    c_mask, h_mask, d_mask = c < C, h < NH, d < DI
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)                                                      # [BH, BD]
    if PAGED:  # candidate c is entry c % ENTRIES of block tables[t, c // ENTRIES] of a pool: read in place
        blk = tl.load(tab_ptr + t * stride_tt + c // ENTRIES, mask=c_mask, other=0).to(tl.int64)
        row = blk * stride_kb + (c % ENTRIES).to(tl.int64) * stride_kc
    else:
        row = t.to(tl.int64) * stride_kt + c.to(tl.int64) * stride_kc
    if KEYS_FP8:  # packed uint8 keys (kv_fp8's layout, strides in bytes): e4m3 dims, then one fp32 scale
        keys = tl.load(k_ptr.to(tl.pointer_type(tl.float8e4nv)) + row[:, None] + d[None, :],
                       mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)        # [BC, BD]
        scale = tl.load(k_ptr.to(tl.pointer_type(tl.float32)) + (row + DI) // 4, mask=c_mask, other=0.0)
        keys = keys * scale[:, None]                                  # dequantized in registers, as unpack_index
    else:
        keys = tl.load(k_ptr + row[:, None] + d[None, :],
                       mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)        # [BC, BD]
    w = tl.load(w_ptr + t * stride_wt + h, mask=h_mask, other=0.0).to(tl.float32)              # [BH]
    s = tl.maximum(tl.dot(q, tl.trans(keys), input_precision="ieee"), 0.0) * head_scale       # [BH, BC]
    score = tl.sum(s * w[:, None], axis=0)                                                     # [BC]
    if HAS_VALID:
        ok = tl.load(valid_ptr + t * stride_vt + c, mask=c_mask, other=0) != 0
    else:
        ok = (c >= tl.load(lo_ptr + t)) & (c < tl.load(hi_ptr + t))
    tl.store(out_ptr + t * stride_ot + c, tl.where(ok, score, float("-inf")), mask=c_mask)


def _launch_indexer_scores(q: torch.Tensor, keys: torch.Tensor, stride_kt: int, weights: torch.Tensor,
                           C: int, lo: torch.Tensor | None, hi: torch.Tensor | None, valid: torch.Tensor | None,
                           name: str, keys_fp8: bool = False, tables: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, h, dI]; the keys of row t at keys + t * stride_kt ([C, dI]) -> fp32 scores [T, C], -inf where
    entry c is not selectable (outside [lo_t, hi_t), or not valid[t, c]). keys_fp8: keys are packed uint8
    [C, dI + 4] rows (kv_fp8's layout; strides in bytes). tables [T, W]: keys is a pool [blocks, E, *] instead and
    row t's candidate c is entry c % E of block tables[t, c // E] (C = W * E), read in place."""
    T, NH, DI = q.shape
    for x, what in ((q, "q"), (keys, "keys"), (weights, "weights")):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) and not (what == "keys" and keys_fp8):
            raise ValueError(f"{name}: {what} must be fp32/bf16/fp16, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: {what} is on {x.device}, q on {q.device}")
    if q.stride(2) != 1 or keys.stride(-1) != 1 or weights.stride(1) != 1:
        raise ValueError(f"{name}: the last dims of q, keys and weights must be contiguous (strides {q.stride()}, "
                         f"{keys.stride()}, {weights.stride()})")
    scores = torch.empty(T, C, dtype=torch.float32, device=q.device)
    if T == 0 or C == 0:
        return scores
    if valid is not None:
        valid = valid.to(torch.uint8).contiguous()
        lo = hi = valid  # unused placeholders
    else:
        lo, hi = lo.to(q.device).contiguous(), hi.to(q.device).contiguous()
    if tables is not None:
        if tables.device != q.device or tables.dtype not in (torch.int32, torch.int64) or tables.stride(1) != 1:
            raise ValueError(f"{name}: tables must be contiguous int32/int64 rows on {q.device}, got {tables.dtype} "
                             f"on {tables.device}, strides {tables.stride()}")
        stride_tt, stride_kb, entries = tables.stride(0), keys.stride(0), keys.shape[1]
    else:
        stride_tt, stride_kb, entries = 0, 0, 1
    cfg = indexer_launch_settings(NH, DI)
    launch(_indexer_scores_kernel, (T, triton.cdiv(C, cfg["BLOCK_C"])),
           q, keys, weights, lo, hi, valid if valid is not None else lo, tables if tables is not None else lo, scores,
           NH, C, DI, DI ** -0.5, q.stride(0), q.stride(1), stride_kt, keys.stride(-2), weights.stride(0),
           valid.stride(0) if valid is not None else 0, scores.stride(0), stride_tt, stride_kb, entries,
           HAS_VALID=valid is not None, KEYS_FP8=keys_fp8, PAGED=tables is not None, **cfg)
    record_triton_call(name)
    return scores


def indexer_topk_triton(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor, topk: int) -> torch.Tensor:
    """Triton scores + torch stable top-k; same contract as `indexer_topk_ref`."""
    C = keys.shape[0]
    k = min(topk, C)
    if C == 0:
        return torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    scores = _launch_indexer_scores(q, keys, 0, weights, C, lo, hi, None, "indexer_topk")
    idx = stable_topk(scores, k)
    invalid = (idx < lo[:, None]) | (idx >= hi[:, None])
    return torch.where(invalid, torch.full_like(idx, -1), idx)


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """Dispatch point for indexer scoring + top-k: Triton scores or the torch reference (see `backend`). Stacked
    groups (q [G, T, h, dI], keys [G, C, dI]: `indexer_topk_ref`) are a torch-backend form."""
    stacked = q.dim() == 4
    if (q.dim() not in (3, 4) or keys.dim() != q.dim() - 1 or keys.shape[:-2] != q.shape[:-3]
            or keys.shape[-1] != q.shape[-1] or weights.shape != q.shape[:-1]):
        raise ValueError(f"indexer_topk: q [(G,)T,h,dI]={tuple(q.shape)}, keys [(G,)C,dI]={tuple(keys.shape)}, "
                         f"weights [(G,)T,h]={tuple(weights.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        if stacked:
            raise ValueError("indexer_topk: stacked groups are a torch-backend form (the Triton kernel scores one "
                             "group: q [T,h,dI], keys [C,dI])")
        return indexer_topk_triton(q, keys, weights, lo, hi, topk)
    return indexer_topk_ref(q, keys, weights, lo, hi, topk)


def _top_valid(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k best-scoring candidates of each row [n, E] (`stable_topk`), -1 where a row has fewer than k valid
    ones."""
    idx = stable_topk(scores, k)
    return torch.where(valid.gather(1, idx), idx, torch.full_like(idx, -1))


def indexer_topk_padded_ref(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                            topk: int) -> torch.Tensor:
    """Each query with its own candidate keys: q [n, h, dI], keys [n, E, dI], weights [n, h], valid [n, E]
    -> indices [n, min(topk, E)] into each row's E (-1 = none). Same scores and tie rule as `indexer_topk`."""
    n, E = valid.shape
    k = min(topk, E)
    if E == 0:
        return torch.empty(n, 0, dtype=torch.long, device=q.device)
    return _top_valid(index_scores(q, keys, weights).masked_fill(~valid, float("-inf")), valid, k)


def indexer_topk_padded_triton(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                               topk: int) -> torch.Tensor:
    """Triton scores + torch stable top-k; same contract as `indexer_topk_padded_ref`."""
    n, E = valid.shape
    k = min(topk, E)
    if E == 0:
        return torch.empty(n, 0, dtype=torch.long, device=q.device)
    scores = _launch_indexer_scores(q, keys, keys.stride(0), weights, E, None, None, valid, "indexer_topk_padded")
    return _top_valid(scores, valid, k)


def indexer_topk_padded(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                        topk: int) -> torch.Tensor:
    """Dispatch point for decode-time indexer scoring over per-query candidates: Triton scores or the torch
    reference."""
    if keys.dim() != 3 or keys.shape[0] != q.shape[0] or valid.shape != keys.shape[:2]:
        raise ValueError(f"indexer_topk_padded: q {tuple(q.shape)}, keys [n,E,dI] {tuple(keys.shape)}, valid "
                         f"{tuple(valid.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        return indexer_topk_padded_triton(q, keys, weights, valid, topk)
    return indexer_topk_padded_ref(q, keys, weights, valid, topk)


def indexer_scores_paged_triton(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, weights: torch.Tensor,
                                valid: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's paged form: `indexer_topk_paged`'s scores [n, W * E] (-inf where not valid), the keys
    (fp32/bf16, or FP8-packed uint8) read in place from pool [blocks, E, *] through tables [n, W]."""
    return _launch_indexer_scores(q, pool, 0, weights, valid.shape[1], None, None, valid, "indexer_topk_paged",
                                  keys_fp8=pool.dtype == torch.uint8, tables=tables)


def _paged_top(q: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, topk: int,
               fresh_index: torch.Tensor | None, fresh_key: torch.Tensor | None) -> torch.Tensor:
    """A paged scoring's top-k: row t's fresh entry (column fresh_index[t], not in the pool yet) scored from its key
    (storage form: FP8-packed uint8 or fp32/bf16) in place of what the pool held there, then the masked stable
    top-k."""
    n, E = valid.shape
    if fresh_index is not None:
        key = unpack_index_ref(fresh_key, torch.float32) if fresh_key.dtype == torch.uint8 else fresh_key
        own = index_scores(q, key[:, None, :], weights)[:, 0]                       # [n]
        cols = torch.arange(E, device=q.device)
        scores = torch.where(cols[None, :] == fresh_index[:, None], own[:, None], scores)
    return _top_valid(scores.masked_fill(~valid, float("-inf")), valid, min(topk, E))


def indexer_topk_paged_ref(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, weights: torch.Tensor,
                           valid: torch.Tensor, topk: int, fresh_index: torch.Tensor | None = None,
                           fresh_key: torch.Tensor | None = None) -> torch.Tensor:
    """`indexer_topk_paged` with torch's scores: on the CPU the native kernel reading the pool in place
    (kernels/paged_cpu.py), elsewhere (and for FP8-packed keys, unpacked) gathered keys and one GEMM."""
    if valid.shape[1] == 0:
        return torch.empty(valid.shape[0], 0, dtype=torch.long, device=q.device)
    scores = paged_index_scores(q, pool, tables, weights)                           # [n, W * E]
    return _paged_top(q, scores, weights, valid, topk, fresh_index, fresh_key)


def indexer_topk_paged_triton(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, weights: torch.Tensor,
                              valid: torch.Tensor, topk: int, fresh_index: torch.Tensor | None = None,
                              fresh_key: torch.Tensor | None = None) -> torch.Tensor:
    """`indexer_topk_paged` with the Triton kernel's paged form reading the pool in place (FP8 keys dequantized in
    registers)."""
    if valid.shape[1] == 0:
        return torch.empty(valid.shape[0], 0, dtype=torch.long, device=q.device)
    scores = indexer_scores_paged_triton(q, pool, tables, weights, valid)
    return _paged_top(q, scores, weights, valid, topk, fresh_index, fresh_key)


def indexer_topk_paged(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, weights: torch.Tensor,
                       valid: torch.Tensor, topk: int, fresh_index: torch.Tensor | None = None,
                       fresh_key: torch.Tensor | None = None) -> torch.Tensor:
    """`indexer_topk_padded` with each row's candidates read in place from a key pool through its block table, not
    from a gathered copy (the decode step): q [n, h, dI], pool [blocks, E, dI] (fp32/bf16, or FP8-packed uint8
    [blocks, E, dI + 4]), tables [n, W], weights [n, h], valid [n, W * E] -> indices [n, min(topk, W * E)] into each
    row's W * E columns (-1 = none). fresh_index [n] / fresh_key [n, dI] (storage form): row t's entry
    fresh_index[t] (-1: none) is not in the pool yet; it is scored from fresh_key instead. Same scores and tie rule
    as `indexer_topk_padded` over the gathered keys."""
    if kernel_backend(q.device) == "triton":
        return indexer_topk_paged_triton(q, pool, tables, weights, valid, topk, fresh_index, fresh_key)
    return indexer_topk_paged_ref(q, pool, tables, weights, valid, topk, fresh_index, fresh_key)


def indexer_topk_padded_fp8_ref(q: torch.Tensor, packed: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                                topk: int) -> torch.Tensor:
    """`indexer_topk_padded_ref` over FP8-packed keys [n, E, dI + 4] uint8, unpacked to fp32 first
    (kv_fp8.unpack_index_ref)."""
    return indexer_topk_padded_ref(q, unpack_index_ref(packed, torch.float32), weights, valid, topk)


def indexer_topk_padded_fp8_triton(q: torch.Tensor, packed: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                                   topk: int) -> torch.Tensor:
    """Triton form of `indexer_topk_padded_fp8_ref`: the scoring kernel reads the packed keys and dequantizes them
    in registers (e4m3 times the fp32 scale, in fp32, as the reference's unpack)."""
    name = "indexer_topk_padded_fp8"
    n, E = valid.shape
    DI = q.shape[2]
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[2] != index_entry_bytes(DI):
        raise ValueError(f"{name}: packed keys must be uint8 [n, E, {index_entry_bytes(DI)}] for dI {DI}; got "
                         f"{packed.dtype} {list(packed.shape)}")
    if packed.stride(0) % 4 or packed.stride(1) % 4 or DI % 4:
        raise ValueError(f"{name}: entry strides {packed.stride()[:2]} and dI {DI} must be multiples of 4 (the fp32 "
                         f"scale is read in place); pass the gathered keys contiguous")
    k = min(topk, E)
    if E == 0:
        return torch.empty(n, 0, dtype=torch.long, device=q.device)
    scores = _launch_indexer_scores(q, packed, packed.stride(0), weights, E, None, None, valid, name, keys_fp8=True)
    return _top_valid(scores, valid, k)


def indexer_topk_padded_fp8(q: torch.Tensor, packed_keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                            topk: int) -> torch.Tensor:
    """Dispatch point for decode-time indexer scoring over gathered FP8 cache keys (the KV cache's "fp8" format,
    kernels/kv_fp8.py): q [n, h, dI], packed_keys [n, E, dI + 4] uint8, weights [n, h], valid [n, E] bool ->
    indices [n, min(topk, E)] into each row's E (-1 = none); the scores and tie rule of `indexer_topk_padded` over
    the keys unpacked to fp32."""
    if packed_keys.dim() != 3 or packed_keys.shape[0] != q.shape[0] or valid.shape != packed_keys.shape[:2]:
        raise ValueError(f"indexer_topk_padded_fp8: q {tuple(q.shape)}, packed_keys [n,E,dI+4] "
                         f"{tuple(packed_keys.shape)}, valid {tuple(valid.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        return indexer_topk_padded_fp8_triton(q, packed_keys, weights, valid, topk)
    return indexer_topk_padded_fp8_ref(q, packed_keys, weights, valid, topk)
