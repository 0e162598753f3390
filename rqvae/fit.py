"""fit / encode: train an RQ-VAE (or residual k-means) on a plain float matrix and turn rows into codes.

The whole standardised matrix lives as one tensor on the device; batches are index gathers on it (no
DataLoader, no per-batch host copies). On CUDA OOM the batch is halved, then the run falls back to the CPU.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genrec.core import dist as rdist
from genrec.core.device import peak_memory_mb, resolve_device

from .config import RQVAEConfig
from .model import PCA, RQVAE

log = logging.getLogger(__name__)

_CHUNK = 65536
_STAT_BYTES = 4 << 20  # float64 temporaries of the variance pass: cache-sized (a 65536-row one took 512 MiB at 1024-d)


def _rows_f32(x: np.ndarray, lo: int, buf: np.ndarray) -> np.ndarray:
    """x[lo:lo + len(buf)] as float32 in `buf`, reused from batch to batch (a fresh batch-sized array pays its page
    faults every time; float64 input converts to the same float32 as np.array)."""
    part = buf[:min(len(buf), x.shape[0] - lo)]
    np.copyto(part, x[lo:lo + len(part)], casting="unsafe")
    return part


def _standardised(model: RQVAE, x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Set the model's normalisation from `x` and return standardised x on `device`, built chunk by chunk so
    the host never holds a second full copy besides the input (nor a float64 one: the variance pass works in
    cache-sized pieces, and one float32 host batch is reused)."""
    n, d = x.shape
    s = np.zeros(d, np.float64)
    for lo in range(0, n, _CHUNK):
        s += x[lo:lo + _CHUNK].sum(0, dtype=np.float64)
    mean = s / max(n, 1)
    sq, rows = 0.0, max(1, _STAT_BYTES // (8 * max(d, 1)))
    for lo in range(0, n, rows):
        diff = x[lo:lo + rows] - mean  # float64
        sq += float(np.square(diff, out=diff).sum())
    model.mean.copy_(torch.from_numpy(mean).float())
    model.scale.fill_(max((sq / max(n * d, 1)) ** 0.5, 1e-8))
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    buf = np.empty((min(n, _CHUNK), d), np.float32)
    for lo in range(0, n, _CHUNK):
        part = _rows_f32(x, lo, buf)
        model.standardise(out[lo:lo + len(part)].copy_(torch.from_numpy(part)), inplace=True)
    return out


def _sample(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k] if n > k else torch.arange(n)


def _sync_from_lead(model: RQVAE) -> None:
    """Data-parallel: every rank starts from (and after a reseed, continues with) rank 0's weights and codebooks."""
    for t in [*model.parameters(), *model.buffers()]:
        rdist.broadcast_(t.data)


def _adam(model: RQVAE, lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch has it for the device (CPU since torch 2.4): the step's
    parameters are a few small matrices, so the per-tensor loop of the default cost 3x more."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def _fit_on(x: np.ndarray, cfg: RQVAEConfig, device: torch.device, batch: int,
            data_parallel: bool = False) -> tuple[RQVAE, dict]:
    t = {"start": time.perf_counter()}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d = x.shape
    model = RQVAE(d, cfg).to(device)
    x_std = _standardised(model, x, device)
    t["normalise"] = time.perf_counter()
    sample = _sample(n, cfg.kmeans_sample, gen).to(device)
    with torch.no_grad():
        if isinstance(model.encoder, PCA):
            model.encoder.fit(x_std[sample])
        model.quantizer.init_from_data(model.encoder(x_std[sample]), cfg.kmeans_iters, gen, batch, cfg.kmeans_start(),
                                       cfg.balanced_assignment())
    dp = data_parallel and rdist.world() > 1
    if dp:
        _sync_from_lead(model)
    model.quantizer.sync = dp
    t["kmeans_init"] = time.perf_counter()
    report: dict[str, Any] = {"method": cfg.method, "device": str(device), "batch_size": batch, "epochs": 0,
                              "world_size": rdist.world() if dp else 1}
    if cfg.method == "rqvae" and cfg.num_epochs > 0:
        opt = _adam(model, cfg.lr)
        amp = device.type == "cuda"
        L, K = cfg.num_quantizers, cfg.codebook_size
        offsets = torch.arange(L, device=device) * K
        reseeded = 0
        for epoch in range(cfg.num_epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            usage = torch.zeros(L * K, dtype=torch.long, device=device)
            tot = torch.zeros(3, device=device)
            steps = 0
            for lo in range(0, n, batch):
                rows = perm[lo:lo + batch]
                # index_select: 1024 rows of advanced indexing cost 30x more on CPU; data-parallel: this rank's share
                xb = x_std.index_select(0, rows[rdist.my_slice(len(rows))] if dp else rows)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    recon, codes, commit = model(xb)
                rec = F.mse_loss(recon.float(), xb)
                loss = rec + cfg.commitment_cost * commit
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dp:
                    rdist.average_gradients(model.parameters())
                opt.step()
                usage += torch.bincount((codes + offsets).flatten(), minlength=L * K)
                tot += torch.stack([loss.detach(), rec.detach(), commit.detach()])
                steps += 1
            tot = (tot / max(steps, 1)).tolist()
            if (epoch + 1) % 5 == 0 or epoch + 1 == cfg.num_epochs:
                log.info("Epoch %d/%d: Loss=%.4f (recon %.4f, commit %.4f)",
                         epoch + 1, cfg.num_epochs, *tot)
            if dp:
                rdist.all_reduce_sum_(usage)  # a code is dead only when no rank used it
            if epoch + 1 < cfg.num_epochs and (usage == 0).any():
                with torch.no_grad():
                    reseeded += model.quantizer.reseed_dead(model.encoder(x_std[sample]), usage.view(L, K), gen, batch)
                if dp:
                    _sync_from_lead(model)
        report.update(epochs=cfg.num_epochs, final_loss=tot[0], final_recon=tot[1], reseeded_codes=reseeded)
    t["train"] = time.perf_counter()
    model.eval()
    with torch.no_grad():
        xs = x_std[sample]
        z = model.encoder(xs).float()
        codes, _ = model.quantizer.encode(z)
        z_q = model.quantizer.decode(codes)
        report["recon_mse"] = float(F.mse_loss(model.decoder(z_q).float(), xs))  # on standardised input: share of variance lost
        # share of the quantizer input's energy left after each level (what the next level has to work with)
        r, energy, left = z.clone(), float((z * z).sum().clamp_min(1e-12)), []
        for lvl in range(codes.shape[1]):
            r -= model.quantizer.codebooks[lvl][codes[:, lvl]]
            left.append(float((r * r).sum()) / energy)
        report["residual_by_level"] = left
    report["seconds"] = {k: round(t[k] - t[p], 4) for p, k in zip(["start", "normalise", "kmeans_init"],
                                                                  ["normalise", "kmeans_init", "train"])}
    del x_std
    model.quantizer.sync = False
    return model, report


def fit(embeddings: np.ndarray, config: RQVAEConfig | None = None, data_parallel: bool = False
        ) -> tuple[RQVAE, dict]:
    """Train on `embeddings` [N, D] (any float array, a memmap included); returns (model in eval mode, report).
    `data_parallel`: every rank of a torchrun job calls fit with the same rows; each trains on its share of every
    batch, gradients and EMA statistics summed over the ranks, so all end with the same model."""
    cfg = config or RQVAEConfig()
    x = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"fit needs a non-empty [N, D] matrix, got shape {x.shape}")
    if x.shape[0] < cfg.codebook_size:
        log.warning("%d items < codebook size %d: k-means repeats items as codewords", x.shape[0], cfg.codebook_size)
    device, batch = resolve_device(cfg.device), cfg.batch_size
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.enable_grad():
                model, report = _fit_on(x, cfg, device, batch, data_parallel)
            report.update(peak_memory_mb(device))
            return model, report
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch > 64:
                batch //= 2
                log.warning("CUDA out of memory: retrying with batch size %d", batch)
            else:
                log.warning("CUDA out of memory even at batch size %d: falling back to CPU", batch)
                device, batch = torch.device("cpu"), cfg.batch_size


@torch.no_grad()
def encode(model: RQVAE, embeddings: np.ndarray, batch_size: int | None = None,
           return_residual: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Codes [N, num_quantizers] (int64) for each row; with return_residual also the residual entering the
    last level (used by dedup to rank alternative last codes)."""
    device = model.mean.device
    bs = batch_size or model.cfg.encode_batch_size
    x = embeddings
    n = x.shape[0]
    L = model.cfg.num_quantizers
    codes = np.zeros((n, L), np.int64)
    resid = None
    model.eval()
    lo = 0
    buf = np.empty((min(n, bs), x.shape[1]), np.float32)  # one host batch: the batch size only ever shrinks
    while lo < n:
        try:
            xb = model.standardise(torch.from_numpy(_rows_f32(x, lo, buf[:bs])).to(device), inplace=True)
            c, last_r = model.quantizer.encode(model.encoder(xb).float())
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if bs <= 256:
                raise
            bs //= 2
            log.warning("CUDA out of memory while encoding: batch size %d", bs)
            continue
        codes[lo:lo + len(c)] = c.cpu().numpy()
        if return_residual:
            if resid is None:
                resid = np.zeros((n, last_r.shape[1]), np.float32)
            resid[lo:lo + len(c)] = last_r.cpu().numpy()
        lo += len(c)
    return (codes, resid) if return_residual else codes
