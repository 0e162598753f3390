"""Chunked Lloyd k-means on torch tensors: distances by matmul, empty clusters re-seeded from far points."""
from __future__ import annotations

import torch

_CHUNK = 32768


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row of `c` for each row of `x`, and the squared distance to it."""
    c_sq = (c * c).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        d = torch.addmm(c_sq, xb, c.T, alpha=-2.0)  # ||x||^2 is constant per row: argmin without it
        m, i = d.min(1)
        idx[lo:lo + chunk] = i
        dist[lo:lo + chunk] = (m + (xb * xb).sum(1)).clamp_min_(0)
    return idx, dist


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """k centroids of `x` [n, d]. With n <= k every point becomes a centroid and the rest repeat them."""
    n = x.shape[0]
    if n <= k:
        return x[torch.arange(k, device=x.device) % n].clone()
    perm = torch.randperm(n, generator=generator, device="cpu").to(x.device)
    c = x[perm[:k]].clone()
    for _ in range(iters):
        idx, dist = nearest(x, c)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # move empty clusters onto the worst-served points
            far = dist.topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c
