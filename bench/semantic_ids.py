"""Benchmark: semantic-ID quality and speed, side by side, on the same data in one run.

Methods
  ours            RQVAEConfig() defaults (k-means init, EMA codebooks, dead-code reseeding)
  ours+dedup      the same with --dedup
  ours rqkmeans   residual k-means, no network (PCA to --pca_dim, k-means++ init)
  rqkmeans balanced       the same with balanced assignment (--balanced)
  rqkmeans first version  no PCA, random init, unbalanced (what rqkmeans was before PCA and k-means++)
  public recipe   re-implementation of the public code: random-normal codebooks, encoder [d/2] -> latent d/4
                  (ReLU), decoder mirrored, codebook + 0.25 commitment loss, Adam 1e-3, batch 1024 via a
                  DataLoader, 20 epochs, 4 x 256, raw (unstandardised) input
  faiss RQ b1     faiss.ResidualQuantizer(d, 4, 8), max_beam_size 1 (needs the bench extra)

Columns: seconds (train + encode), collision rate (1 - unique/N), largest group, codes used per level,
perplexity per level, and how often an item and its 10 nearest neighbours share the first code.

    python bench/semantic_ids.py [--sets 50kx32 real 200kx1024] [--device cpu|cuda] [--methods ...]
"""
from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genrec.core.cli import FlagParser  # noqa: E402
from harness import Report  # noqa: E402
from rqvae import RQVAEConfig, encode, fit  # noqa: E402
from rqvae.dedup import dedup_codes  # noqa: E402
from rqvae.stats import collision_stats, level_stats  # noqa: E402


def clustered(n: int, d: int, k: int = 1000, seed: int = 0) -> np.ndarray:
    """Mixture of k Gaussian clusters with uneven sizes, like item embeddings of many categories."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    sizes = rng.pareto(1.5, k) + 1
    x = centres[rng.choice(k, n, p=sizes / sizes.sum())]
    for lo in range(0, n, 65536):  # in place, in blocks: no second full-size temporary
        x[lo:lo + 65536] += 0.5 * rng.standard_normal((min(65536, n - lo), d), dtype=np.float32)
    return x


def nn_first_code_agreement(x: np.ndarray, codes: np.ndarray, device: str, k: int = 10, sample: int = 2000) -> float:
    """How often an item and each of its k nearest neighbours (cosine) share the first code (torch, any device)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randperm(len(x), generator=g)[:sample]
    xs = torch.from_numpy(x)
    norms = torch.cat([xs[lo:lo + 65536].to(device).norm(dim=1) for lo in range(0, len(x), 65536)]).clamp_min(1e-12)
    qv = xs[q].to(device) / norms[q.to(device)][:, None]
    best_s = torch.full((len(q), k), -float("inf"), device=device)
    best_i = torch.zeros((len(q), k), dtype=torch.long, device=device)
    for lo in range(0, len(x), 65536):
        s = qv @ (xs[lo:lo + 65536].to(device) / norms[lo:lo + 65536][:, None]).T
        own = (q.to(device) >= lo) & (q.to(device) < lo + s.shape[1])
        s[own.nonzero().flatten(), (q.to(device)[own] - lo)] = -float("inf")
        cs, ci = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(lo, lo + s.shape[1], device=device).expand(len(q), -1)], 1)
        best_s, pos = cs.topk(k, dim=1)
        best_i = ci.gather(1, pos)
    c0 = torch.from_numpy(codes[:, 0])
    return float((c0[best_i.cpu()] == c0[q][:, None]).float().mean())


# --- the public recipe, re-implemented --------------------------------------------------------------------
class PublicRQVAE(nn.Module):
    def __init__(self, d: int, levels: int = 4, k: int = 256):
        super().__init__()
        h, z = max(d // 2, 1), max(d // 4, 1)
        self.enc = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, z))
        self.dec = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, d))
        self.codebooks = nn.ParameterList(nn.Parameter(torch.randn(k, z)) for _ in range(levels))

    def quantize(self, z):
        r, q_sum, codes, loss = z, torch.zeros_like(z), [], 0.0
        for cb in self.codebooks:
            idx = torch.cdist(r, cb).argmin(1)
            q = cb[idx]
            loss = loss + F.mse_loss(q, r.detach()) + 0.25 * F.mse_loss(r, q.detach())
            q_sum = q_sum + q
            r = r - q.detach()
            codes.append(idx)
        return z + (q_sum - z).detach(), torch.stack(codes, 1), loss


def public_recipe(x: np.ndarray, device: str, epochs: int = 20) -> np.ndarray:
    torch.manual_seed(0)
    xt = torch.from_numpy(x)
    m = PublicRQVAE(x.shape[1]).to(device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt), batch_size=1024, shuffle=True)
    for _ in range(epochs):
        for (xb,) in loader:
            xb = xb.to(device)
            zq, _, qloss = m.quantize(m.enc(xb))
            loss = F.mse_loss(m.dec(zq), xb) + qloss
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.cat([m.quantize(m.enc(xt[lo:lo + 65536].to(device)))[1].cpu()
                          for lo in range(0, len(xt), 65536)]).numpy()


def faiss_rq(x: np.ndarray) -> np.ndarray:
    import faiss

    rq = faiss.ResidualQuantizer(x.shape[1], 4, 8)
    rq.max_beam_size = 1
    rq.train(x)
    return rq.compute_codes(x).astype(np.int64)  # 8-bit codes: one byte per level


# our methods: RQVAEConfig overrides
OURS = {"ours": {}, "ours+dedup": {"dedup": True}, "ours rqkmeans": {"method": "rqkmeans"},
        "rqkmeans balanced": {"method": "rqkmeans", "balanced": True},
        "rqkmeans first version": {"method": "rqkmeans", "pca_dim": 0, "kmeans_init": "random", "balanced": False}}


def run_method(name: str, x: np.ndarray, device: str) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    if name in OURS:
        cfg = RQVAEConfig(device=device, **OURS[name])
        model, _ = fit(x, cfg)
        if cfg.dedup:
            codes, resid = encode(model, x, return_residual=True)
            codes, _ = dedup_codes(codes, resid, model.quantizer.codebooks[-1].cpu().numpy())
        else:
            codes = encode(model, x)
    elif name == "public recipe":
        codes = public_recipe(x, device)
    elif name == "faiss RQ b1":
        codes = faiss_rq(x)
    else:
        raise ValueError(name)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, codes


def load_set(name: str) -> np.ndarray:
    if name == "real":
        from real_texts import real_embeddings
        return real_embeddings()
    n, d = name.lower().split("x")
    n = int(n.replace("k", "000").replace("m", "000000"))
    return clustered(n, int(d))


def main() -> None:
    p = FlagParser(description=__doc__)
    p.add_argument("--sets", nargs="+", default=["50kx32", "real"])
    p.add_argument("--methods", nargs="+", default=["ours", "ours+dedup", "ours rqkmeans", "public recipe", "faiss RQ b1"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    say = Report()
    say(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))
    for s in a.sets:
        x = load_set(s)
        say(f"\n## {s}: {x.shape[0]} x {x.shape[1]}")
        say("| method | seconds | vs public recipe | collision rate | largest group | codes used per level | "
              "perplexity per level | 10-NN share first code |")
        say("|---|---|---|---|---|---|---|---|")
        rows = []
        for mname in a.methods:
            try:
                secs, codes = run_method(mname, x, a.device)
            except ImportError as e:
                say(f"| {mname} | skipped ({e}) |")
                continue
            cs, ls = collision_stats(codes), level_stats(codes, 256)
            rows.append((mname, secs, cs, ls, nn_first_code_agreement(x, codes, a.device)))
        base = next((r[1] for r in rows if r[0] == "public recipe"), None)
        for mname, secs, cs, ls, nn_agree in rows:
            ratio = f"{base / secs:.1f}x" if base else "-"
            used = "/".join(str(lv["used"]) for lv in ls)
            perplexity = "/".join("%.0f" % lv["perplexity"] for lv in ls)
            say(f"| {mname} | {secs:.2f} | {ratio} | {cs['collision_rate']:.4f} | {cs['largest_group']} | "
                  f"{used} | {perplexity} | {nn_agree:.3f} |")
        sys.stdout.flush()
    say(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    say.write("semantic_ids", "Semantic IDs: quality and speed")


if __name__ == "__main__":
    main()
