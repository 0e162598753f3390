"""Residual quantizer: one codebook per level, initialised by k-means on that level's residuals and updated by
exponential moving averages (no codebook gradients: cheaper per step and no codebook-loss scale to tune)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .kmeans import kmeans, nearest, row_min

log = logging.getLogger(__name__)


class ResidualQuantizer(nn.Module):
    """Level l quantizes what levels < l left over. Used by the RQ-VAE (on its latent) and by rqkmeans (on x)."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("codebooks", torch.zeros(num_levels, codebook_size, dim))
        self.register_buffer("ema_count", torch.ones(num_levels, codebook_size))
        self.register_buffer("ema_sum", torch.zeros(num_levels, codebook_size, dim))
        # Balanced assignment (rqkmeans --balanced): code j of level l wins where distance - bias[l, j] is least.
        self.register_buffer("bias", torch.zeros(num_levels, codebook_size))
        # Data-parallel training (fit under torchrun): the EMA statistics are summed over the ranks, so every rank
        # holds the same codebooks.
        self.sync = False

    @property
    def num_levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @torch.no_grad()
    def _set_code(self, lvl: int, which: torch.Tensor | slice, vectors: torch.Tensor, count: float) -> None:
        self.codebooks[lvl, which] = vectors
        self.ema_count[lvl, which] = count
        self.ema_sum[lvl, which] = vectors * count

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, iters: int = 20, generator: torch.Generator | None = None,
                       batch_size: int = 1024, init: str = "kmeans++", balanced: bool = False) -> None:
        """k-means on the residuals of each level, in order."""
        if z.shape[0] < self.codebook_size:
            log.info("only %d points for %d codes per level: codebooks repeat points", z.shape[0], self.codebook_size)
        r = z.float().clone()
        self.bias.zero_()
        for lvl in range(self.num_levels):
            c, bias = kmeans(r, self.codebook_size, iters, generator, init, balanced)
            self._set_code(lvl, slice(None), c, batch_size / self.codebook_size)
            if bias is not None:
                self.bias[lvl] = bias
            idx, _ = nearest(r, c, bias=self.bias[lvl])
            r -= c[idx]

    @torch.no_grad()
    def reseed_dead(self, z: torch.Tensor, usage: torch.Tensor, generator: torch.Generator | None = None,
                    batch_size: int = 1024) -> int:
        """Move codes unused in `usage` [levels, K] onto residuals of `z` that are quantized worst."""
        r = z.float().clone()
        moved = 0
        for lvl in range(self.num_levels):
            cb = self.codebooks[lvl]
            idx, dist = nearest(r, cb)
            dead = (usage[lvl] == 0).nonzero().flatten()
            k = min(len(dead), r.shape[0])
            if k:
                # sample among the worst-served quarter so reseeded codes do not all land on a few outliers
                pool = dist.topk(max(k, r.shape[0] // 4)).indices
                pick = pool[torch.randperm(len(pool), generator=generator)[:k].to(pool.device)]
                self._set_code(lvl, dead[:k], r[pick], batch_size / self.codebook_size)
                moved += k
                idx, _ = nearest(r, cb)
            r -= cb[idx]
        return moved

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through quantized z, codes [B, levels], commitment loss). In training mode the codebooks
        follow the EMA of the residuals assigned to them."""
        L, (B, D) = self.num_levels, z.shape
        # Only the search is sequential (level l needs the residual level l-1 left); everything else runs once for
        # all levels: on CPU the per-level small ops cost more than the distance products.
        res = z.new_empty((L, B, D), dtype=torch.float32)  # residual entering each level
        res[0] = z.detach()
        c_sq = (self.codebooks * self.codebooks).sum(2)
        codes = torch.empty((L, B), dtype=torch.long, device=z.device)
        q = res.new_empty((L, B, D))
        # fp32 distances and argmin even under autocast (bf16 would assign 0.2-0.3% of rows differently from
        # `encode`, which runs in fp32), so training and serving pick the same codes
        with torch.autocast(z.device.type, enabled=False):
            for lvl in range(L):
                cb = self.codebooks[lvl]
                codes[lvl] = row_min(torch.addmm(c_sq[lvl], res[lvl], cb.T, alpha=-2.0))[1]
                torch.index_select(cb, 0, codes[lvl], out=q[lvl])
                if lvl + 1 < L:
                    torch.sub(res[lvl], q[lvl], out=res[lvl + 1])
        if self.training:
            self._ema_update(codes, res)
        partial = q  # in place: partial[l] = the sum of the first l + 1 codewords (cumsum over dim 0: 10x slower)
        for lvl in range(1, L):
            partial[lvl] += partial[lvl - 1]
        # RQ-VAE paper: commit to every partial sum (the sum over levels of each level's mean squared error)
        commit = F.mse_loss(z.float().expand(L, B, D), partial, reduction="sum") / (B * D)
        z_q = z + (partial[-1].to(z.dtype) - z).detach()
        return z_q, codes.T, commit

    @torch.no_grad()
    def _ema_update(self, codes: torch.Tensor, res: torch.Tensor) -> None:
        """EMA of each code's count and sum of assigned residuals, all levels at once (`codes` [L, B], `res`
        [L, B, D]); under data-parallel training (`sync`) the batch statistics are summed over the ranks first,
        so every rank holds the same codebooks."""
        L, K, D = self.codebooks.shape
        flat = (codes + torch.arange(L, device=codes.device)[:, None] * K).flatten()
        cnt = torch.bincount(flat, minlength=L * K).to(res.dtype)
        tot = res.new_zeros((L * K, D)).index_add_(0, flat, res.reshape(-1, D))  # with alpha: 4x slower on CPU
        if self.sync:
            from genrec.core.dist import all_reduce_sum_

            cnt, tot = all_reduce_sum_(cnt), all_reduce_sum_(tot)
        d = self.decay
        self.ema_count.mul_(d).add_(cnt.view(L, K), alpha=1 - d)
        self.ema_sum.mul_(d).add_(tot.view(L, K, D), alpha=1 - d)
        torch.div(self.ema_sum, self.ema_count.clamp_min(1e-5)[..., None], out=self.codebooks)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, levels], residual entering the last level)."""
        r = z.float().clone()
        codes = []
        last_r = r
        for lvl in range(self.num_levels):
            if lvl == self.num_levels - 1:
                last_r = r.clone()
            idx, _ = nearest(r, self.codebooks[lvl], bias=self.bias[lvl])
            r -= self.codebooks[lvl][idx]
            codes.append(idx)
        return torch.stack(codes, 1), last_r

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the codewords of `codes` [N, levels]."""
        return sum(self.codebooks[lvl][codes[:, lvl]] for lvl in range(self.num_levels))
