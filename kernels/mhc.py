"""Manifold-constrained hyper-connection weights (mHC, V4_MODEL.md §2.1).

From n residual streams: pre (collapse), post (expand) and comb (stream mixing, projected towards a doubly
stochastic matrix by Sinkhorn iterations). Everything here runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mhc_weights_ref(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                    norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """x [N, n, D] streams -> pre [N, n], post [N, n], comb [N, n, n] (fp32)."""
    n = x.shape[1]
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    mix = F.linear(flat, fn.float())
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.view(-1, n, n) * s[2] + comb_b.view(n, n), dim=-1) + hc_eps
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    for _ in range(sinkhorn_iters - 1):  # in place: this loop is ~40 tiny ops per call
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(hc_eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    return pre, post, comb


def mhc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """Dispatch point for the mHC pre/post/comb computation (torch reference today)."""
    n = x.shape[1]
    if x.dim() != 3 or fn.shape != ((2 + n) * n, n * x.shape[2]):
        raise ValueError(f"mhc_weights: x [N,n,D]={tuple(x.shape)} needs fn [{(2 + n) * n}, {n * x.shape[2]}], "
                         f"got {tuple(fn.shape)}")
    return mhc_weights_ref(x, fn, base, scale, norm_eps, hc_eps, sinkhorn_iters)
