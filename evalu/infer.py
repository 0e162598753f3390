"""Inference: top-10 candidates per test user, with the lazy semantic-ID bootstrap.

    python evalu/infer.py [--data_dir D --result_dir R --model_dir M] [flags]

Paths default to EVAL_DATA_PATH, EVAL_RESULT_PATH and MODEL_OUTPUT_PATH. With none of them set it runs on the
built-in demo world (created, and a small model trained, on the first run; cached in $GENREC_CACHE_DIR or
~/.cache/genrec). Writes result.json (the competition's format) and infer_report.json to the results dir.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python evalu/infer.py` from a checkout: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from dataset import TestDataset, load_labels
from dataset.safeio import cache_root, write_json
from model.metrics import rank_metrics, ranks_in_topk
from evalu.retrieval import topk_faiss, topk_inner_product
from evalu.semantic_bootstrap import ensure_semantic_ids
from model.checkpoint import is_checkpoint, load_checkpoint
from model.recommender import Recommender
from rqvae import RQVAEConfig
from rqvae.fit import peak_memory_mb, resolve_device

log = logging.getLogger("evalu.infer")

RESULT_FILE, REPORT_FILE = "result.json", "infer_report.json"
DEMO_VERSION = "3"  # bump when the demo world or the model format changes: cached demos are rebuilt


@dataclass
class InferConfig:
    data_dir: str | None = None  # EVAL_DATA_PATH
    result_dir: str | None = None  # EVAL_RESULT_PATH
    model_dir: str | None = None  # MODEL_OUTPUT_PATH: a checkpoint folder, or a folder of them (newest wins)
    mm_emb_id: list[str] | None = None  # features for new semantic IDs (default: the checkpoint RQ-VAE's, else 81)
    allow_semantic_generation: bool = True  # ALLOW_SEMANTIC_GENERATION
    filter_seen: bool | None = None  # drop items already in the user's history; None: as the checkpoint chose
    retrieval: str = "torch"  # torch | faiss
    labels: str | None = None  # labels file for metrics (the demo world has one)
    query_batch_size: int = 512
    device: str = "auto"

    @classmethod
    def from_env_and_args(cls, a: argparse.Namespace) -> "InferConfig":
        env = os.environ
        gen = env.get("ALLOW_SEMANTIC_GENERATION", "true").strip().lower() not in ("0", "false", "no", "off")
        d = dict(data_dir=env.get("EVAL_DATA_PATH"), result_dir=env.get("EVAL_RESULT_PATH"),
                 model_dir=env.get("MODEL_OUTPUT_PATH"), allow_semantic_generation=gen)
        names = {f.name for f in fields(cls)}
        d.update({k: v for k, v in vars(a).items() if k in names and v is not None})
        return cls(**d)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="eval data dir (env EVAL_DATA_PATH)")
    p.add_argument("--result_dir", help="where result.json goes (env EVAL_RESULT_PATH)")
    p.add_argument("--model_dir", help="checkpoint folder (env MODEL_OUTPUT_PATH)")
    p.add_argument("--mm_emb_id", nargs="+", help="creative_emb features for new semantic IDs")
    p.add_argument("--allow_semantic_generation", type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                   help="true/false (env ALLOW_SEMANTIC_GENERATION, default true)")
    p.add_argument("--filter-seen", "--filter_seen", dest="filter_seen", action="store_true", default=None,
                   help="never recommend items already in the user's history (default: what the checkpoint's "
                        "validation chose, see train.py --filter_seen)")
    p.add_argument("--no-filter-seen", "--no_filter_seen", dest="filter_seen", action="store_false",
                   help="rank every candidate, history items included")
    p.add_argument("--retrieval", choices=("torch", "faiss"), help="exact top-10 backend (default torch)")
    p.add_argument("--labels", help="labels file ({user_id, creative_id, action_type} per line) for metrics")
    p.add_argument("--query_batch_size", type=int)
    g = p.add_argument_group("RQ-VAE (only when new semantic IDs must be trained)")
    RQVAEConfig.add_arguments(g)
    return p.parse_args(argv)


def _demo_paths(cfg: InferConfig) -> InferConfig:
    """Fill in the demo world's paths, creating the world and training its model on the first run."""
    from dataset.synth import SynthConfig, generate
    from model.trainer import TrainConfig, train

    root = cache_root() / "demo"
    train_dir, eval_dir, model_dir = root / "train", root / "eval", root / "model"
    stamp = root / "VERSION"
    if root.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != DEMO_VERSION):
        log.info("the demo world in %s is from another version: rebuilding it", root)
        shutil.rmtree(root)
    if not (eval_dir / "predict_set.jsonl").is_file() or not (train_dir / "seq.jsonl").is_file():
        log.info("no EVAL_DATA_PATH / EVAL_RESULT_PATH / MODEL_OUTPUT_PATH set: creating the demo world in %s", root)
        generate(train_dir, SynthConfig(), eval_out=eval_dir)
        stamp.write_text(DEMO_VERSION + "\n")
    if not is_checkpoint(model_dir):
        log.info("no demo model yet: training a small one once (cached in %s)", model_dir)
        train(TrainConfig(data_dir=str(train_dir), output_dir=str(model_dir), epochs=6))
    return InferConfig(**{**asdict(cfg), "data_dir": str(eval_dir), "model_dir": str(model_dir),
                          "result_dir": cfg.result_dir or str(root / "results"),
                          "labels": cfg.labels or str(eval_dir / "labels.jsonl")})


def _find_checkpoint(model_dir: Path) -> Path:
    if is_checkpoint(model_dir):
        return model_dir
    subs = [d for d in model_dir.iterdir() if d.is_dir() and is_checkpoint(d)] if model_dir.is_dir() else []
    if not subs:
        raise FileNotFoundError(f"no checkpoint (model.pt + config.json) in {model_dir} or its subfolders")
    return max(subs, key=lambda d: (d / "config.json").stat().st_mtime)


@torch.no_grad()
def _retrieve(model: Recommender, ds: TestDataset, cfg: InferConfig, device: torch.device) -> tuple[list[list[int]], float]:
    """Top-10 raw creative ids per user; also the time embedding finished (for the report)."""
    model.eval()
    slots = ds.candidate_slots
    cand = torch.cat([model.item_vectors(torch.as_tensor(slots[lo:lo + 65536], device=device))
                      for lo in range(0, len(slots), 65536)]) if len(slots) else \
        torch.zeros(0, model.cfg.hidden, device=device)
    queries = torch.cat([model.query(torch.as_tensor(ds.seqs[lo:lo + cfg.query_batch_size], device=device),
                                     torch.as_tensor(ds.user_sparse[lo:lo + cfg.query_batch_size], device=device),
                                     torch.as_tensor(ds.user_array[lo:lo + cfg.query_batch_size], device=device))
                         for lo in range(0, len(ds), cfg.query_batch_size)]) if len(ds) else cand[:0]
    t_embed = time.perf_counter()
    # History items: removed (--filter-seen), or scored with the model's learnt offset for them.
    exclude, offset = None, float("-inf") if cfg.filter_seen else model.history_offset()
    if offset != 0:
        pos_of_slot = {int(s): i for i, s in enumerate(ds.candidate_slots)}
        exclude = [np.asarray([pos_of_slot[s] for s in h.tolist() if s in pos_of_slot], np.int64) for h in ds.histories]
    if cfg.retrieval == "faiss":
        _, idx = topk_faiss(queries.float().cpu().numpy(), cand.float().cpu().numpy(), 10, exclude, offset)
    else:
        _, idx = topk_inner_product(queries, cand, 10, exclude, offset=offset)
        idx = idx.numpy()
    cids = ds.candidates.creative_ids
    top10s = [[int(cids[i]) for i in row if i >= 0] for row in idx]
    return top10s, t_embed


def run(cfg: InferConfig, rq_args: Any = None) -> tuple[list[list[int]], list[str], dict]:
    """Everything but writing files: (top10s, users, report)."""
    t = {"start": time.perf_counter()}
    if not (cfg.data_dir or cfg.result_dir or cfg.model_dir):
        cfg = _demo_paths(cfg)
    if not (cfg.data_dir and cfg.model_dir and cfg.result_dir):
        raise ValueError("set --data_dir/--model_dir/--result_dir (or EVAL_DATA_PATH, MODEL_OUTPUT_PATH, "
                         "EVAL_RESULT_PATH), or none of them for the demo")
    result_dir = Path(cfg.result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    ckpt = _find_checkpoint(Path(cfg.model_dir))
    model, meta, rq, trained_ids = load_checkpoint(ckpt, device)
    log.info("model %s (trained on %s)", ckpt, meta.get("train", {}).get("data_dir", "?"))
    t["load_model"] = time.perf_counter()
    ds = TestDataset(cfg.data_dir, schema=model.schema, maxlen=model.cfg.maxlen, sid_dirs=[result_dir])
    log.info("test dataset: %d users, %d candidates", len(ds), len(ds.candidate_slots))
    t["load_data"] = time.perf_counter()
    if model.cfg.use_semantic_ids:
        boot = ensure_semantic_ids(ds, result_dir, rq, (meta.get("rqvae") or {}).get("features"), trained_ids,
                                   cfg.allow_semantic_generation, cfg.mm_emb_id, rq_args)
        boot_info = asdict(boot)
    else:
        boot_info = {"status": "unused (the model was trained without semantic IDs)"}
    t["semantic_ids"] = time.perf_counter()

    model.items.set_store(ds.store)
    if cfg.filter_seen is None:
        cfg = replace(cfg, filter_seen=bool(meta.get("train", {}).get("filter_seen", False)))
    log.info("history filtering %s", "on" if cfg.filter_seen else "off")
    top10s, t["embed"] = _retrieve(model, ds, cfg, device)
    t["retrieve"] = time.perf_counter()

    report: dict[str, Any] = {"checkpoint": str(ckpt), "data_dir": str(cfg.data_dir), "result_dir": str(result_dir),
                              "users": len(ds),
                              "candidates": int(len(ds.candidate_slots)), "semantic_id": boot_info,
                              "filter_seen": cfg.filter_seen,
                              "device": str(device)}
    labels_path = cfg.labels
    if labels_path and Path(labels_path).is_file():
        report["metrics"] = evaluate(top10s, ds.users, labels_path, set(ds.indexer["i"].keys()))
        for name, m in report["metrics"].items():
            log.info("%s: HR@10 %.4f  NDCG@10 %.4f  score %.4f  (%d users)", name, m["hr@10"], m["ndcg@10"],
                     m["score"], m["users"])
    stages = ["start", "load_model", "load_data", "semantic_ids", "embed", "retrieve"]
    report["seconds"] = {b: round(t[b] - t[a], 3) for a, b in zip(stages, stages[1:])}
    report["seconds"]["total"] = round(time.perf_counter() - t["start"], 3)
    report["memory"] = peak_memory_mb(device)
    return top10s, ds.users, report


def evaluate(top10s: list[list[int]], users: list[str], labels_path: str, warm: set) -> dict:
    """Metrics overall and on cold-start targets (items never seen in training); conversions weigh 2.5."""
    labels = load_labels(labels_path)
    have = [i for i, u in enumerate(users) if u in labels]
    targets = [labels[users[i]][0] for i in have]
    weights = np.asarray([2.5 if labels[users[i]][1] == 2 else 1.0 for i in have])
    ranks = ranks_in_topk([top10s[i] for i in have], targets)
    cold = np.asarray([t not in warm for t in targets], bool)
    return {"overall": rank_metrics(ranks, weights), "cold_start": rank_metrics(ranks[cold], weights[cold]),
            "warm": rank_metrics(ranks[~cold], weights[~cold])}


def infer(args: argparse.Namespace | None = None) -> tuple[list[list[int]], list[str]]:
    """The competition entry point: (top10s, user_list), raw creative ids and raw user ids."""
    args = args if args is not None else parse_args([])
    top10s, users, _ = run(InferConfig.from_env_and_args(args), args)
    return top10s, users


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = InferConfig.from_env_and_args(args)
    t0 = time.perf_counter()
    try:
        top10s, users, report = run(cfg, args)
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return 1
    result_dir = Path(report["result_dir"])  # run() resolved it (the demo's, when no paths are set)
    write_json(result_dir / RESULT_FILE, {"time": round(time.perf_counter() - t0, 3), "top10s": top10s, "user": users},
               compact=True)
    write_json(result_dir / REPORT_FILE, report)
    log.info("wrote %s and %s (%d users)", result_dir / RESULT_FILE, result_dir / REPORT_FILE, len(users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
