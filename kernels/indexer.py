"""Lightning Indexer scoring and causal top-k (docs/v4_model.md §2.4).

I_{t,j} = sum_h w_{t,h} * ReLU(q_{t,h} . k_j) * d_I^-1/2; query t may select entries j in [lo_t, hi_t) (its own
sequence's closed windows in a batch of several sequences); top-k over those, -1 where fewer than k are visible. Exactly equal scores (e.g. every head's ReLU
at zero) resolve to the lower entry index, so a query selects the same entries however many future entries
its row holds (full prefill vs. incremental decode).

Triton path: the scores I_{t,j} come from one kernel (a program per query row and block of entries: all index
heads in one [h, dI] x [dI, entries] dot, ReLU, head weights, sum over heads, -inf outside the row's selectable
entries); the top-k is then torch's stable descending sort over those scores, the same selection code as the
reference, so the lower-index tie rule holds exactly (exact ties are exact zeros in both paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import kernel_backend, record_triton_call, triton_interpreted


def indexer_topk_ref(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, topk: int) -> torch.Tensor:
    """q [T, h, dI], keys [C, dI], weights [T, h] (already scaled by h^-1/2), lo/hi [T] -> indices
    [T, min(topk, C)] into keys (int64, -1 = no entry: fewer than topk selectable)."""
    C = keys.shape[0]
    k = min(topk, C)
    if C == 0:
        return torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    scores = torch.einsum("thd,cd->thc", q.float(), keys.float()).relu() * (q.shape[-1] ** -0.5)
    scores = (scores * weights.float()[..., None]).sum(dim=1)  # [T, C]
    j = torch.arange(C, device=q.device)[None, :]
    outside = (j < lo[:, None]) | (j >= hi[:, None])
    scores = scores.masked_fill(outside, float("-inf"))
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    invalid = (idx < lo[:, None]) | (idx >= hi[:, None])
    return torch.where(invalid, torch.full_like(idx, -1), idx)


@triton.jit
def _indexer_scores_kernel(q_ptr, k_ptr, w_ptr, lo_ptr, hi_ptr, valid_ptr, out_ptr, NH, C, DI, head_scale,
                           stride_qt, stride_qh, stride_kt, stride_kc, stride_wt, stride_vt, stride_ot,
                           HAS_VALID: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    c_mask, h_mask, d_mask = c < C, h < NH, d < DI
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)                                                      # [BH, BD]
    keys = tl.load(k_ptr + t * stride_kt + c[:, None] * stride_kc + d[None, :],
                   mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)            # [BC, BD]
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
                           name: str) -> torch.Tensor:
    """q [T, h, dI]; the keys of row t at keys + t * stride_kt ([C, dI]) -> fp32 scores [T, C], -inf where
    entry c is not selectable (outside [lo_t, hi_t), or not valid[t, c])."""
    T, NH, DI = q.shape
    for x, what in ((q, "q"), (keys, "keys"), (weights, "weights")):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
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
    block_c = 32 if triton_interpreted() else 64
    _indexer_scores_kernel[(T, triton.cdiv(C, block_c))](
        q, keys, weights, lo, hi, valid if valid is not None else lo, scores, NH, C, DI, DI ** -0.5,
        q.stride(0), q.stride(1), stride_kt, keys.stride(-2), weights.stride(0),
        valid.stride(0) if valid is not None else 0, scores.stride(0),
        HAS_VALID=valid is not None, BLOCK_H=max(16, triton.next_power_of_2(NH)), BLOCK_C=block_c,
        BLOCK_D=max(16, triton.next_power_of_2(DI)))
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
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    invalid = (idx < lo[:, None]) | (idx >= hi[:, None])
    return torch.where(invalid, torch.full_like(idx, -1), idx)


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """Dispatch point for indexer scoring + top-k: Triton scores or the torch reference (see `backend`)."""
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2] or weights.shape != q.shape[:2]:
        raise ValueError(f"indexer_topk: q [T,h,dI]={tuple(q.shape)}, keys [C,dI]={tuple(keys.shape)}, "
                         f"weights [T,h]={tuple(weights.shape)} do not fit")
    if kernel_backend(q.device) == "triton":
        return indexer_topk_triton(q, keys, weights, lo, hi, topk)
    return indexer_topk_ref(q, keys, weights, lo, hi, topk)


def indexer_topk_padded_ref(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                            topk: int) -> torch.Tensor:
    """Each query with its own candidate keys: q [n, h, dI], keys [n, E, dI], weights [n, h], valid [n, E]
    -> indices [n, min(topk, E)] into each row's E (-1 = none). Same scores and tie rule as `indexer_topk`."""
    n, E = valid.shape
    k = min(topk, E)
    if E == 0:
        return torch.empty(n, 0, dtype=torch.long)
    scores = torch.einsum("nhd,ned->nhe", q.float(), keys.float()).relu() * (q.shape[-1] ** -0.5)
    scores = (scores * weights.float()[..., None]).sum(dim=1).masked_fill(~valid, float("-inf"))  # [n, E]
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.where(valid.gather(1, idx), idx, torch.full_like(idx, -1))


def indexer_topk_padded_triton(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                               topk: int) -> torch.Tensor:
    """Triton scores + torch stable top-k; same contract as `indexer_topk_padded_ref`."""
    n, E = valid.shape
    k = min(topk, E)
    if E == 0:
        return torch.empty(n, 0, dtype=torch.long, device=q.device)
    scores = _launch_indexer_scores(q, keys, keys.stride(0), weights, E, None, None, valid, "indexer_topk_padded")
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.where(valid.gather(1, idx), idx, torch.full_like(idx, -1))


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
