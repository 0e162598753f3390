"""Training the recommender (the logic behind `python train.py`).

Semantic IDs: the training dir's `semantic_id_dict.json` is used when present (with the RQ-VAE files beside it,
if any); otherwise an RQ-VAE is trained on the spot. Either way the checkpoint carries the IDs and the RQ-VAE,
so inference encodes new items with the same codebooks.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import TrainDataset
from dataset.safeio import is_writable_dir
from evalu.metrics import rank_metrics
from rqvae import RQVAE, RQVAEConfig, generate_semantic_ids
from rqvae.fit import resolve_device

from .checkpoint import save_checkpoint
from .recommender import ModelConfig, Recommender

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_dir: str = ""
    output_dir: str = ""
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    sid_mm_emb_id: list[str] | None = None  # features the RQ-VAE merges when IDs must be made (default: mm_emb_id)
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "TrainConfig":
        m = ModelConfig.from_dict({k: v for k, v in vars(a).items() if v is not None})
        own = {f.name for f in fields(cls)} - {"model"}
        return cls(model=m, **{k: v for k, v in vars(a).items() if k in own and v is not None})

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        d = cls()
        for name in ("epochs", "batch_size", "num_workers", "seed"):
            p.add_argument(f"--{name}", type=int, default=None, help=f"default {getattr(d, name)}")
        for name in ("lr", "weight_decay"):
            p.add_argument(f"--{name}", type=float, default=None, help=f"default {getattr(d, name)}")
        p.add_argument("--device", default=None, help="auto (cuda when available), cpu, cuda")
        p.add_argument("--sid_mm_emb_id", nargs="+", default=None, help="features for new semantic IDs (default: --mm_emb_id)")
        m = ModelConfig()
        for f in fields(ModelConfig):
            val = getattr(m, f.name)
            if isinstance(val, bool):
                p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                               help=f"true/false, default {val}")
            elif isinstance(val, list):
                p.add_argument(f"--{f.name}", nargs="+", default=None, help=f"default {' '.join(val)}")
            else:
                p.add_argument(f"--{f.name}", type=type(val), default=None, help=f"default {val}")


@torch.no_grad()
def evaluate(model: Recommender, val: dict[str, torch.Tensor], device: torch.device, batch: int = 512) -> dict:
    """Full ranking of each held-out click among all training items (HR@10, NDCG@10, score)."""
    model.eval()
    n_items = model.schema.num_items
    items = torch.cat([model.item_vectors(torch.arange(lo, min(lo + 65536, n_items + 1), device=device))
                       for lo in range(1, n_items + 1, 65536)])  # row r = slot r + 1
    ranks = []
    for lo in range(0, len(val["target"]), batch):
        q = model.query(*(val[k][lo:lo + batch].to(device) for k in ("seq", "user_sparse", "user_array")))
        s = q @ items.T
        t = val["target"][lo:lo + batch].to(device)
        ts = s.gather(1, (t - 1)[:, None])
        ranks.append(((s > ts).sum(1) + 1).cpu())
    model.train()
    return rank_metrics(torch.cat(ranks).numpy() if ranks else np.zeros(0))


def _semantic_ids(ds: TrainDataset, cfg: TrainConfig, device: torch.device
                  ) -> tuple[RQVAE | None, list[str] | None]:
    """Make sure the training items have semantic IDs; return the RQ-VAE behind them (when known)."""
    feats = [str(f) for f in (cfg.sid_mm_emb_id or cfg.model.mm_emb_id)]
    if ds.semantic_id_dict:
        src = ds.semantic_id_path.parent
        log.info("loaded semantic_id for %d items from %s", len(ds.semantic_id_dict), ds.semantic_id_path)
        if (src / RQVAE.MODEL_FILE).is_file() and (src / RQVAE.CONFIG_FILE).is_file():
            return RQVAE.load(src, device), _features_of(src, feats)
        log.warning("no RQ-VAE beside %s: inference cannot encode new items with the same codebooks",
                    ds.semantic_id_path)
        return None, None
    out = ds.data_dir if is_writable_dir(ds.data_dir) else Path(cfg.output_dir)
    log.info("no semantic_id found, training an RQ-VAE on features %s", feats)
    rq_cfg = RQVAEConfig(device=str(device), seed=cfg.seed)
    sids, rq, _ = generate_semantic_ids(ds.data_dir, feats, rq_cfg, output_dir=out)
    if not sids:
        log.warning("training without semantic IDs: none could be generated")
        return None, None
    rq.save(out)
    ds.sid_dirs.append(out)
    ds.rebuild()
    return rq, feats


def _features_of(rq_dir: Path, default: list[str]) -> list[str]:
    """Features an RQ-VAE was trained on, from the report written beside it."""
    rep = rq_dir / "semantic_id_report.json"
    try:
        return list(json.loads(rep.read_text())["features"])
    except (OSError, ValueError, KeyError):
        return default


@torch.enable_grad()
def train(cfg: TrainConfig) -> Path:
    """Train and write the checkpoint folder; returns its path."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    if not is_writable_dir(out):
        raise PermissionError(f"output dir {out} is not writable")
    mc = cfg.model
    ds = TrainDataset(cfg.data_dir, mm_emb_ids=mc.mm_emb_id, maxlen=mc.maxlen, sid_dirs=[out])
    rq, rq_feats = _semantic_ids(ds, cfg, device) if mc.use_semantic_ids else (None, None)
    log.info("training on %d users, %d items, semantic-ID coverage %.1f%%", len(ds), ds.schema.num_items,
             100 * ds.semantic_id_coverage)
    model = Recommender(ds.schema, mc).to(device)
    model.items.set_store(ds.store)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, generator=gen,
                        drop_last=len(ds) > cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    val = ds.validation_samples()
    best, best_state, history = -1.0, None, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        tot, steps = 0.0, 0
        for batch in tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model.loss(batch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += loss.item()
            steps += 1
        m = evaluate(model, val, device)
        history.append({"epoch": epoch, "loss": tot / max(steps, 1), **m})
        log.info("epoch %d/%d: loss %.4f, val HR@10 %.4f, NDCG@10 %.4f (%d users)", epoch, cfg.epochs,
                 tot / max(steps, 1), m["hr@10"], m["ndcg@10"], m["users"])
        if m["score"] > best:
            best, best_state = m["score"], copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    info = {"data_dir": str(Path(cfg.data_dir).resolve()), "history": history, "best_val_score": best,
            "seconds": round(time.perf_counter() - t0, 2),
            "config": {k: v for k, v in asdict(cfg).items() if k != "model"}}
    save_checkpoint(out, model, info, rq, rq_feats, ds.semantic_id_dict if mc.use_semantic_ids else None)
    log.info("saved checkpoint to %s (best val score %.4f)", out, best)
    return out
