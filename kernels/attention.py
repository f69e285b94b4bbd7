"""Shared-KV multi-query attention with a per-head sink (V4_MODEL.md §2.2).

p_{h,s} = exp(l_{h,s}) / (sum_s' exp(l_{h,s'}) + exp(sink_h)); o_h = sum_s p_{h,s} v_s with v = k (K = V).
"""

from __future__ import annotations

import torch


def sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [T, H, d], kv [S, d] (one shared K=V head), bias [T, S] (0 or -inf), sinks [H] -> [T, H, d].

    Logits, softmax and the probability-weighted sum run in fp32; the result is cast to q's dtype.
    """
    logits = torch.einsum("thd,sd->hts", q.float(), kv.float()) * scale + bias.float()[None]
    sink_col = sinks.float()[:, None, None].expand(-1, q.shape[0], 1)
    combined = torch.cat([logits, sink_col], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.einsum("hts,sd->thd", probs, kv.float()).to(q.dtype)


def sparse_sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Each query row with its own gathered keys: q [n, H, d], kv [n, K, d], bias [n, K] (0 / -inf, e.g. padding)
    -> [n, H, d]. The decode form: window ring + selected compressed entries per sequence."""
    logits = torch.einsum("nhd,nkd->nhk", q.float(), kv.float()) * scale + bias.float()[:, None, :]
    sink_col = sinks.float()[None, :, None].expand(q.shape[0], -1, 1)
    combined = torch.cat([logits, sink_col], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("nhk,nkd->nhd", probs, kv.float()).to(q.dtype)


def sparse_sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Dispatch point for sparse decode attention over per-query gathered keys (torch reference today)."""
    n, H, d = q.shape
    if kv.dim() != 3 or kv.shape[0] != n or kv.shape[2] != d or bias.shape != kv.shape[:2] or sinks.shape != (H,):
        raise ValueError(f"sparse_sink_attention: q [n,H,d]={tuple(q.shape)}, kv [n,K,d]={tuple(kv.shape)}, "
                         f"bias [n,K]={tuple(bias.shape)}, sinks [H]={tuple(sinks.shape)} do not fit")
    return sparse_sink_attention_ref(q, kv, bias, sinks, scale)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Dispatch point for sparse attention over window + compressed entries (torch reference today)."""
    T, H, d = q.shape
    if kv.dim() != 2 or kv.shape[1] != d or bias.shape != (T, kv.shape[0]) or sinks.shape != (H,):
        raise ValueError(f"sink_attention: q [T,H,d]={tuple(q.shape)}, kv [S,d]={tuple(kv.shape)}, "
                         f"bias [T,S]={tuple(bias.shape)}, sinks [H]={tuple(sinks.shape)} do not fit")
    return sink_attention_ref(q, kv, bias, sinks, scale)
