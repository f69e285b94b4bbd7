"""Lightning Indexer scoring and causal top-k (V4_MODEL.md §2.4).

I_{t,j} = sum_h w_{t,h} * ReLU(q_{t,h} . k_j) * d_I^-1/2; query t may select entries j in [lo_t, hi_t) (its own
sequence's closed windows in a batch of several sequences); top-k over those, -1 where fewer than k are visible. Exactly equal scores (e.g. every head's ReLU
at zero) resolve to the lower entry index, so a query selects the same entries however many future entries
its row holds (full prefill vs. incremental decode).
"""

from __future__ import annotations

import torch


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


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 topk: int) -> torch.Tensor:
    """Dispatch point for indexer scoring + top-k (torch reference today)."""
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2] or weights.shape != q.shape[:2]:
        raise ValueError(f"indexer_topk: q [T,h,dI]={tuple(q.shape)}, keys [C,dI]={tuple(keys.shape)}, "
                         f"weights [T,h]={tuple(weights.shape)} do not fit")
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


def indexer_topk_padded(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                        topk: int) -> torch.Tensor:
    """Dispatch point for decode-time indexer scoring over per-query candidates (torch reference today)."""
    if keys.dim() != 3 or keys.shape[0] != q.shape[0] or valid.shape != keys.shape[:2]:
        raise ValueError(f"indexer_topk_padded: q {tuple(q.shape)}, keys [n,E,dI] {tuple(keys.shape)}, valid "
                         f"{tuple(valid.shape)} do not fit")
    return indexer_topk_padded_ref(q, keys, weights, valid, topk)
