"""Chunked Lloyd k-means on torch tensors: distances by matmul, k-means++ or random init, empty clusters re-seeded
from far points, and an optional balanced assignment.

Balanced assignment gives each centroid a bias b_j and assigns x to argmin_j ||x - c_j||^2 - b_j. The biases are
the dual variables of the optimal transport of the points onto the centroids with equal mass each (Sinkhorn
iterations), so every cluster gets about n / k points. The biases are kept with the codebook: new items are
assigned by the same rule, and the codes stay balanced on them too.
"""
from __future__ import annotations

import torch

_CHUNK = 32768
_CPU_BLOCK = 1 << 19  # elements of one CPU distance block (2 MiB in fp32): it stays in cache while reduced
INITS = ("kmeans++", "random")


def row_min(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`d.min(1)` exactly: each row's minimum and the first index holding it. On CPU torch reduces min / argmin
    over a row with a scalar loop (about 2.5 ns an element here) but amin with vector instructions, so the index is
    recovered with two more vectorised passes and a second amin: 2-3x faster. Rows whose minimum is not finite
    take torch's path."""
    k = d.shape[1]
    if d.device.type != "cpu" or d.dtype not in (torch.float32, torch.float64) or k == 0 or k > 1 << 22:
        return d.min(1)
    m = d.amin(1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        return d.min(1)
    # sign(d - m) is 0 exactly where d equals its row's minimum (x - y == 0 iff x == y), else 1: the key
    # index + k * sign is least at the first minimum, and exact in fp32 while 2k < 2^24
    key = torch.add(torch.arange(k, dtype=d.dtype, device=d.device), torch.sub(d, m).sign_(), alpha=k)
    return m.squeeze(1), key.amin(1).long()


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int | None = None, bias: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row of `c` for each row of `x` (argmin of distance - `bias`, when given), and the
    squared distance to it. Rows go in chunks: on CPU small enough for the distance block to stay in cache (a
    32768-row block ran 2x slower), elsewhere `_CHUNK` (fewer launches)."""
    if chunk is None:
        chunk = max(256, _CPU_BLOCK // max(c.shape[0], 1)) if x.device.type == "cpu" else _CHUNK
    c_sq = (c * c).sum(1)
    if bias is not None:
        c_sq = c_sq - bias
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        d = torch.addmm(c_sq, xb, c.T, alpha=-2.0)  # ||x||^2 is constant per row: argmin without it
        m, i = row_min(d)
        if bias is not None:
            m = m + bias[i]
        idx[lo:lo + chunk] = i
        dist[lo:lo + chunk] = (m + (xb * xb).sum(1)).clamp_min_(0)
    return idx, dist


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.addmm((c * c).sum(1), x, c.T, alpha=-2.0).add_((x * x).sum(1, keepdim=True)).clamp_min_(0)


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling): each new centroid is a point drawn with probability proportional to its
    squared distance to the nearest centroid so far. Spreads the centroids over the data, where a random pick
    puts several into one dense region and leaves sparse ones without any."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    d = _sq_dist(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        cum = d.double().cumsum(0)
        total = float(cum[-1])
        if total <= 0:  # every point already sits on a centroid: take any other point
            nxt = int(torch.randint(n, (1,), generator=generator))
        else:
            # inverse-CDF draw (torch.multinomial spent 0.3 ms a draw on 16k points here): the first point whose
            # cumulative weight exceeds u has weight > 0; rounding at the very top falls back to the farthest point
            u = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
            nxt = int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device), right=True))
            if nxt >= n or float(d[nxt]) <= 0:
                nxt = int(d.argmax())
        idx.append(nxt)
        d = torch.minimum(d, _sq_dist(x, x[nxt:nxt + 1]).squeeze(1))
    return x[torch.as_tensor(idx, device=x.device)].clone()


def balanced_bias(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None, iters: int = 50,
                  temperature: float = 0.05) -> torch.Tensor:
    """Per-centroid bias that makes argmin(distance - bias) put about n / k points in every cluster: the column
    potentials of an entropic optimal transport with uniform marginals (Sinkhorn), warm-started from `bias`.
    `temperature` is relative to the median gap between a point's distance to a centroid and to its nearest one
    (the median: outliers' gaps are huge and would make the transport too soft to balance)."""
    n, k = x.shape[0], c.shape[0]
    d = _sq_dist(x, c)
    d -= d.amin(1, keepdim=True)  # values only: amin is vectorised, min(1) a scalar loop on CPU (see row_min)
    eps = max(float(d.median()) * temperature, 1e-12)
    g = torch.zeros(k, dtype=x.dtype, device=x.device) if bias is None else bias / eps
    target = n / k
    # Exp domain with absorption (stabilised Sinkhorn): two matrix-vector products an iteration instead of two
    # log-sum-exps, each several passes over [n, k]. When the scalings span more than 1e-15, they are absorbed
    # into the potentials and the kernel is rebuilt from them (one exp pass). A kernel row is scaled to a maximum
    # of 1 (Sinkhorn is blind to row scales), so its sum never underflows; a column that underflows entirely
    # (a centroid out of every point's reach) is floored, and its potential grows over the next absorptions.
    logits = d.div_(-eps)

    def kernel(pot: torch.Tensor) -> torch.Tensor:
        z = logits + pot
        return z.sub_(z.amax(1, keepdim=True)).exp_()

    kern, v = kernel(g), torch.ones_like(g)
    for _ in range(iters):
        v = target / (kern.T @ (1 / (kern @ v))).clamp_min_(1e-30)
        v /= v.max()
        if float(v.min()) < 1e-15:
            g, v = g + v.clamp_min(1e-37).log(), torch.ones_like(g)
            kern = kernel(g)
    g = g + v.clamp_min(1e-37).log()
    return (g - g.mean()) * eps


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None,
           init: str = "kmeans++", balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k centroids of `x` [n, d], per-centroid bias or None). With n <= k every point becomes a centroid and
    the rest repeat them."""
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}, got {init!r}")
    n = x.shape[0]
    if n <= k:
        return x[torch.arange(k, device=x.device) % n].clone(), None
    if init == "kmeans++":
        c = kmeans_pp(x, k, generator)
    else:
        c = x[torch.randperm(n, generator=generator, device="cpu").to(x.device)[:k]].clone()
    bias = None
    for _ in range(iters):
        if balanced:  # a few Sinkhorn steps per Lloyd step, warm-started: the biases follow the centroids
            bias = balanced_bias(x, c, bias, iters=10)
        idx, dist = nearest(x, c, bias=bias)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # move empty clusters onto the worst-served points
            far = dist.topk(int(empty.sum())).indices
            c[empty] = x[far]
    if balanced:
        bias = balanced_bias(x, c, bias)
    return c, bias
