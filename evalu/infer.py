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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python evalu/infer.py` from a checkout: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from dataset import TestDataset, load_labels
from dataset.datasets import is_target
from evalu import shard
from evalu.generative import PoolIndex, beam_search, generative_topk
from evalu.retrieval import SCORE_DTYPES, topk_faiss, topk_scored
from evalu.semantic_bootstrap import ensure_semantic_ids, id_file_check
from genrec.core import dist as rdist
from genrec.core.alloc import tune_allocator
from genrec.core.cli import (CliError, FlagParser, add_dataclass_arguments, add_logging_arguments, env_bool,
                             from_namespace, run_cli, setup_logging)
from genrec.core.device import peak_memory_mb, resolve_device
from genrec.core.safeio import DataFormatError, cache_root, is_writable_dir, write_json
from genrec.recommender.checkpoint import Checkpoint, is_checkpoint, load_checkpoint
from genrec.recommender.metrics import rank_metrics, ranks_in_topk, target_weights
from genrec.recommender.recommender import Recommender
from rqvae import RQVAEConfig

log = logging.getLogger("evalu.infer")

RESULT_FILE, REPORT_FILE = "result.json", "infer_report.json"
DEMO_VERSION = "4"  # bump when the demo world or the model format changes: cached demos are rebuilt


@dataclass
class InferConfig:
    data_dir: str | None = None  # EVAL_DATA_PATH
    result_dir: str | None = None  # EVAL_RESULT_PATH
    model_dir: str | None = None  # MODEL_OUTPUT_PATH: a checkpoint folder, or a folder of them (newest wins)
    mm_emb_id: list[str] | None = None  # features for new semantic IDs (default: the checkpoint RQ-VAE's, else 81)
    allow_semantic_generation: bool = True  # ALLOW_SEMANTIC_GENERATION
    filter_seen: bool | None = None  # drop items already in the user's history; None: as the checkpoint chose
    retrieval: str = "torch"  # torch | faiss (exact dense) | generative | hybrid (the generative head's beam)
    beam_width: int = 256  # generative / hybrid: IDs kept per level of the beam
    # torch retrieval: the dtype candidates are scored in first; below fp32 a shortlist is rescored in fp32 and
    # proven exact per user (evalu.retrieval.topk_shortlist). auto: bf16 on CUDA and on CPUs with bf16
    # instructions (AVX512-BF16, AMX), else fp32.
    score_dtype: str = "auto"
    labels: str | None = None  # labels file for metrics; default: the data dir's labels.jsonl when there is one
    query_batch_size: int = 512
    device: str = "auto"
    plot: bool = False  # draw semantic_id_report.png when the bootstrap makes IDs (needs matplotlib)
    num_shards: int = 1  # no-network sharding: this process answers shard `shard_id` of `num_shards` of the users
    shard_id: int = 0

    CHOICES = {"retrieval": ("torch", "faiss", "generative", "hybrid"), "score_dtype": ("auto", *SCORE_DTYPES)}
    HELP = {"data_dir": "eval data dir (env EVAL_DATA_PATH)", "result_dir": "where result.json goes (env EVAL_RESULT_PATH)",
            "model_dir": "checkpoint folder, or a folder of them: the newest wins (env MODEL_OUTPUT_PATH)",
            "mm_emb_id": "creative_emb features for new semantic IDs (default: the checkpoint RQ-VAE's, else 81)",
            "allow_semantic_generation": "make missing semantic IDs (env ALLOW_SEMANTIC_GENERATION)",
            "filter_seen": "never recommend items already in the user's history (default: what the checkpoint's "
                           "validation chose, see train.py --filter_seen)",
            "retrieval": "torch / faiss: the exact dense top-10; generative: the items behind the generative head's "
                         "beam over the pool's semantic IDs; hybrid: those plus the items the beam cannot reach (no "
                         "ID, or never trained on), ranked by the dense score (generative and hybrid need a "
                         "checkpoint trained with --generative_head true)",
            "beam_width": "generative / hybrid: semantic IDs the beam keeps at each level",
            "labels": "labels file ({user_id, creative_id, action_type} per line) for metrics; default: the data "
                      "dir's labels.jsonl, if any",
            "query_batch_size": "users embedded per batch",
            "score_dtype": "--retrieval torch (and hybrid, for the items the beam cannot reach): score in this dtype "
                           "first, then rescore a shortlist in float32 (the same top-10, proven per user); auto: "
                           "bfloat16 on CUDA and on CPUs with bf16 instructions (AVX512-BF16, AMX), else float32",
            "plot": "when the bootstrap makes IDs, also draw semantic_id_report.png beside its report (needs matplotlib)",
            "num_shards": "split the users into this many shards, each run anywhere on its own (no network); "
                          "merge with genrec-merge / python -m evalu.shard",
            "shard_id": "which shard this process answers (0 .. num_shards - 1)",
            "device": "inference device, and the RQ-VAE's when IDs are made: auto (cuda when available), cpu, cuda"}

    @classmethod
    def from_env_and_args(cls, a: argparse.Namespace) -> "InferConfig":
        env = os.environ
        d = dict(data_dir=env.get("EVAL_DATA_PATH") or None, result_dir=env.get("EVAL_RESULT_PATH") or None,
                 model_dir=env.get("MODEL_OUTPUT_PATH") or None,
                 allow_semantic_generation=env_bool("ALLOW_SEMANTIC_GENERATION", True))
        return from_namespace(cls, {**d, **{k: v for k, v in vars(a).items() if v is not None}})

    def check(self) -> None:
        """Wrong values found before any work (and before any folder is made): CliError, one line."""
        if self.query_batch_size < 1:
            raise CliError(f"--query_batch_size must be >= 1, got {self.query_batch_size}")
        if self.beam_width < 1:
            raise CliError(f"--beam_width must be >= 1, got {self.beam_width}")
        if self.num_shards < 1 or not 0 <= self.shard_id < self.num_shards:
            raise CliError(f"--shard_id {self.shard_id} --num_shards {self.num_shards}: want 0 <= shard_id < num_shards")
        if self.num_shards > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise CliError("--num_shards is for runs without torchrun; under torchrun the ranks share the work")
        if self.retrieval == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise CliError("--retrieval faiss needs faiss (pip install faiss-cpu, or the bench extra); "
                               "--retrieval torch needs nothing") from None
        if self.plot:
            from rqvae.plot import require_matplotlib

            try:
                require_matplotlib()
            except ImportError as e:
                raise CliError(str(e)) from None
        if self.labels and not Path(self.labels).is_file():
            raise CliError(f"--labels {self.labels}: no such file")
        for name in ("data_dir", "model_dir"):
            path = getattr(self, name)
            if path and not Path(path).is_dir():
                raise CliError(f"--{name} {path}: no such folder")
        resolve_device(self.device)


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__)
    taken: set[str] = set()
    add_dataclass_arguments(p, InferConfig, taken=taken)
    g = p.add_argument_group("RQ-VAE (only when new semantic IDs must be trained)")
    add_dataclass_arguments(g, RQVAEConfig, taken=taken)
    add_logging_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _demo_paths(cfg: InferConfig) -> InferConfig:
    """Fill in the demo world's paths, creating the world and training its model on the first run."""
    from dataset.synth import SynthConfig, generate
    from genrec.recommender.trainer import TrainConfig, train

    root = cache_root() / "demo"
    train_dir, eval_dir, model_dir = root / "train", root / "eval", root / "model"
    stamp = root / "VERSION"
    if root.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != DEMO_VERSION):
        log.info("the demo world in %s is from another version: rebuilding it", root)
        shutil.rmtree(root)
    if not (eval_dir / "predict_set.jsonl").is_file() or not (train_dir / "seq.jsonl").is_file():
        log.info("no EVAL_DATA_PATH / EVAL_RESULT_PATH / MODEL_OUTPUT_PATH set: creating the demo world in %s", root)
        generate(train_dir, replace(SynthConfig(), final_round=True), eval_out=eval_dir)  # the final round's task
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
    # hidden folders are work in progress (a training's staging folder, a save being written): never served
    subs = [d for d in model_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and is_checkpoint(d)] \
        if model_dir.is_dir() else []
    if not subs:
        raise FileNotFoundError(f"no checkpoint (model.pt + config.json) in {model_dir} or its subfolders")
    return max(subs, key=lambda d: (d / "config.json").stat().st_mtime)


@torch.no_grad()
def _retrieve(model: Recommender, ds: TestDataset, cfg: InferConfig, device: torch.device, d: shard.Dist,
              users: tuple[int, int]) -> tuple[np.ndarray, float, dict]:
    """Candidate indices of the top 10 of users [lo, hi) (-1 where fewer), when embedding finished, and this
    process's share (candidates embedded; `retrieval`: how the top 10 was scored). Under torchrun each rank embeds
    whole chunks of the candidates (gathered by all) and scores its users."""
    model.eval()
    slots = ds.candidate_slots
    c_lo, c_hi = shard.span(len(slots), d.world, d.rank, shard.CAND_CHUNK)
    width = model.cfg.hidden + int(model.cfg.item_bias)
    mine = [model.item_vectors(torch.as_tensor(slots[lo:min(lo + shard.CAND_CHUNK, c_hi)], device=device))
            for lo in range(c_lo, c_hi, shard.CAND_CHUNK)]
    cand = rdist.gather_rows(torch.cat(mine) if mine else torch.zeros(0, width, device=device))
    lo, hi, qb = users[0], users[1], cfg.query_batch_size
    queries = torch.cat([model.query(*(torch.as_tensor(a[b:min(b + qb, hi)], device=device)
                                       for a in (ds.seqs, ds.user_sparse, ds.user_array, ds.seq_actions,
                                                 ds.target_actions)))
                         for b in range(lo, hi, qb)]) if hi > lo else torch.zeros(0, width, device=device)
    t_embed = time.perf_counter()
    how: dict[str, Any] = {"backend": cfg.retrieval}
    for name, x in (("queries", queries), ("candidate_vectors", cand)):  # a backstop: never a NaN in a score
        bad = ~torch.isfinite(x).all(1)
        if bool(bad.any()):
            log.warning("%d %s are not finite: scored as zero vectors", int(bad.sum()), name.replace("_", " "))
            x[bad] = 0
            how[f"nonfinite_{name}"] = int(bad.sum())
    # History items: removed (--filter-seen), or scored with the model's learnt offset for them.
    exclude, offset = None, float("-inf") if cfg.filter_seen else model.history_offset()
    if offset != 0:
        pos_of_slot = {int(s): i for i, s in enumerate(slots)}
        exclude = [np.asarray([pos_of_slot[s] for s in h.tolist() if s in pos_of_slot], np.int64)
                   for h in ds.histories[lo:hi]]
    if cfg.retrieval in ("generative", "hybrid"):
        idx = _retrieve_generative(model, ds, cfg, queries, cand, offset, exclude, how)
    elif cfg.retrieval == "faiss":
        _, idx = topk_faiss(queries.float().cpu().numpy(), cand.float().cpu().numpy(), 10, exclude, offset)
    else:
        _, idx, scored = topk_scored(queries, cand, 10, exclude, offset, cfg.score_dtype, shard.topk_user_chunk(qb))
        how.update(scored)
        idx = idx.numpy()
    return np.asarray(idx, np.int64).reshape(-1, 10), t_embed, {"candidates_embedded": c_hi - c_lo, "retrieval": how}


def _retrieve_generative(model: Recommender, ds: TestDataset, cfg: InferConfig, queries: torch.Tensor,
                         cand: torch.Tensor, offset: float, exclude: list[np.ndarray] | None, how: dict) -> np.ndarray:
    """Top 10 of each query's user through the generative head's beam, constrained to the pool's semantic IDs.
    `exclude`: each user's history as pool positions (None when the history offset is 0: nothing to do)."""
    slots = ds.candidate_slots
    index = PoolIndex(ds.store.sid[slots] - 1, model.schema.sid_codebook,  # stored as code + 1; 0: none -> -1
                      unseen=slots > model.schema.num_items)  # slots past the training items: never trained on
    h, qb, hybrid = model.cfg.hidden, cfg.query_batch_size, cfg.retrieval == "hybrid"
    cold = cand[torch.as_tensor(index.unreachable, device=cand.device)] if hybrid else None  # gathered once
    out, invalid, scored = np.full((len(queries), 10), -1, np.int64), 0, 0
    for b in range(0, len(queries), qb):
        q = queries[b:b + qb]
        ids, _, bad = beam_search(model.gen, q[:, :h], index, cfg.beam_width)
        invalid += bad
        out[b:b + qb], n = generative_topk(ids, index, q, cand, 10, exclude[b:b + qb] if exclude is not None else None,
                                           offset, hybrid, cold, cfg.score_dtype)
        scored += n
    short = int(((out >= 0).sum(1) < 10).sum())
    if short:  # a short list is an answer, but never a silent one
        log.warning("%d users got fewer than 10 items: the items behind %d beam IDs%s are all there are (a wider "
                    "--beam_width or --retrieval hybrid gives more)", short, cfg.beam_width,
                    " plus the unreachable ones" if hybrid else "")
    how.update({"beam_width": cfg.beam_width, "invalid_ids": invalid, "unreachable_items": int(len(index.unreachable)),
                "candidates_scored_per_user": round(scored / max(len(queries), 1), 1), "users_short_of_10": short})
    return out


def _whole_run(ranks: list[dict]) -> dict:
    """The run's retrieval figures from every rank's: per-user counts summed (or averaged, weighted by users);
    the candidates are every rank's, so their counts are the same on all."""
    out: dict[str, Any] = {}
    for r in ranks:
        out.update({k: v for k, v in r["retrieval"].items() if k not in out})
    users = sum(r["users"] for r in ranks)
    for key in ("invalid_ids", "users_short_of_10", "rescored_in_float32", "nonfinite_queries"):
        if key in out:
            out[key] = sum(r["retrieval"].get(key, 0) for r in ranks)
    if "candidates_scored_per_user" in out:
        out["candidates_scored_per_user"] = round(sum(r["retrieval"].get("candidates_scored_per_user", 0) * r["users"]
                                                      for r in ranks) / max(users, 1), 1)
    return out


def run(cfg: InferConfig, rq_cfg: RQVAEConfig | None = None) -> tuple[list[list[int]], list[str], dict]:
    """Everything but writing files: (top10s, users, report). Under torchrun every rank takes part and rank 0
    gets all users (the others get empty lists); with --num_shards, the users of this shard. `rq_cfg`: how a new
    RQ-VAE is trained when the checkpoint has none (default: RQVAEConfig() on the inference device)."""
    t = {"start": time.perf_counter()}
    tune_allocator()  # the process is ours: batch-sized tensors stay in the heap
    cfg.check()
    if not (cfg.data_dir or cfg.result_dir or cfg.model_dir):
        cfg = _demo_paths(cfg)
    if not (cfg.data_dir and cfg.model_dir and cfg.result_dir):
        raise CliError("set --data_dir/--model_dir/--result_dir (or EVAL_DATA_PATH, MODEL_OUTPUT_PATH, "
                       "EVAL_RESULT_PATH), or none of them for the demo")
    if cfg.labels is None and (Path(cfg.data_dir) / "labels.jsonl").is_file():
        cfg = replace(cfg, labels=str(Path(cfg.data_dir) / "labels.jsonl"))
    t["setup"] = time.perf_counter()  # the demo world and its model are made here on a first run
    result_dir = Path(cfg.result_dir)
    d = shard.init(resolve_device(cfg.device))
    device = d.device
    with shard.together(d, "loading"):
        ckpt = _find_checkpoint(Path(cfg.model_dir))
        ck = load_checkpoint(ckpt, device)
        model, meta, rq, trained_ids = ck.model, ck.meta, ck.rqvae, ck.trained_ids
        rq_cfg = _rq_config(rq_cfg, cfg, model)
        if cfg.retrieval in ("generative", "hybrid") and model.gen is None:
            raise CliError(f"--retrieval {cfg.retrieval}: the checkpoint {ckpt} has no generative head (train with "
                           f"--generative_head true)")
        log.info("model %s (trained on %s)", ckpt, meta.get("train", {}).get("data_dir", "?"))
        t["load_model"] = time.perf_counter()
        ds = TestDataset(cfg.data_dir, schema=model.schema, maxlen=model.cfg.maxlen, sid_dirs=[result_dir],
                         sid_accept=id_file_check(rq, trained_ids) if model.cfg.use_semantic_ids else None)
        log.info("test dataset: %d users, %d candidates", len(ds), len(ds.candidate_slots))
        if not len(ds.candidate_slots):
            raise DataFormatError(f"{Path(cfg.data_dir) / 'predict_set.jsonl'}: no usable candidate item; nothing "
                                  f"to recommend")
        t["load_data"] = time.perf_counter()
    with shard.together(d, "checking the results folder"):  # made only now, with model and data read everywhere
        if not is_writable_dir(result_dir):
            raise PermissionError(f"results folder {result_dir} cannot be written")

    if model.cfg.use_semantic_ids:
        boot_info = _bootstrap(cfg, d, ds, result_dir, ck, rq_cfg)
    else:
        boot_info = {"status": "unused (the model was trained without semantic IDs)"}
    t["semantic_ids"] = time.perf_counter()

    model.items.set_store(ds.store)
    if cfg.filter_seen is None:
        cfg = replace(cfg, filter_seen=bool(meta.get("train", {}).get("filter_seen", False)))
    log.info("history filtering %s", "on" if cfg.filter_seen else "off")
    parts, part = (d.world, d.rank) if d.active else (cfg.num_shards, cfg.shard_id)
    u_lo, u_hi = shard.span(len(ds), parts, part, 1)  # even shares (sizes differ by at most one user)
    # ... computed within whole query batches of the single-process grid, so every row is the one a single process
    # computes; the at most two partial batches at the ends cost one extra batch each.
    a_lo, a_hi = shard.aligned(u_lo, u_hi, len(ds), cfg.query_batch_size)
    idx, t["embed"], share = _retrieve(model, ds, cfg, device, d, (a_lo, a_hi))
    idx = idx[u_lo - a_lo:u_hi - a_lo]
    share = {"users": u_hi - u_lo, **share}
    if d.active:  # rank order = user order
        idx = rdist.gather_rows(torch.as_tensor(idx)).numpy()
        u_lo, u_hi = 0, len(ds)
    cids = ds.candidates.creative_ids
    top10s = [[int(cids[i]) for i in row if i >= 0] for row in idx]
    users = ds.users[u_lo:u_hi]
    t["retrieve"] = time.perf_counter()

    report: dict[str, Any] = {"checkpoint": str(ckpt), "data_dir": str(cfg.data_dir), "result_dir": str(result_dir),
                              "users": len(users),
                              "candidates": int(len(ds.candidate_slots)), "semantic_id": boot_info,
                              "filter_seen": cfg.filter_seen, "target_actions": ds.action_info,
                              "retrieval": share["retrieval"],
                              "device": str(device), "world_size": d.world}
    if cfg.num_shards > 1:
        report["shard"] = {"shard_id": cfg.shard_id, "num_shards": cfg.num_shards, "user_start": u_lo,
                           "users_total": len(ds), "run": shard.run_fingerprint(ckpt, ds.users, cfg)}
    labels_path = cfg.labels
    if labels_path and Path(labels_path).is_file() and d.lead:
        try:  # metrics are extra: a bad labels file never costs the results
            report["metrics"] = evaluate(top10s, users, labels_path, set(ds.indexer["i"].keys()))
        except (ValueError, OSError) as e:
            log.warning("no metrics: %s", e)
            report["metrics_error"] = str(e)
        for name, m in report.get("metrics", {}).items():
            log.info("%s: HR@10 %.4f  NDCG@10 %.4f  score %.4f  (%d users)", name, m["hr@10"], m["ndcg@10"],
                     m["score"], m["users"])
    stages = ["start", "setup", "load_model", "load_data", "semantic_ids", "embed", "retrieve"]
    report["seconds"] = {b: round(t[b] - t[a], 3) for a, b in zip(stages, stages[1:])}
    report["seconds"]["total"] = round(time.perf_counter() - t["start"], 3)
    report["memory"] = peak_memory_mb(device)
    if d.active:
        ranks = shard.gather_objects(d, {"rank": d.rank, **share, "seconds": report["seconds"], "memory": report["memory"],
                                         "semantic_id_status": boot_info.get("status"),
                                         "semantic_ids_served": len(ds.semantic_id_dict),
                                         "semantic_id_bootstrap": boot_info.get("local_status", boot_info.get("status"))})
        report["ranks"] = ranks
        report["rank"] = d.rank
        report["retrieval"] = _whole_run(ranks)
        if not d.lead:
            return [], [], report
    return top10s, users, report


def _rq_config(rq_cfg: RQVAEConfig | None, cfg: InferConfig, model: Recommender) -> RQVAEConfig:
    """The RQ-VAE settings for new IDs: they must make IDs the checkpoint's model reads (its number of levels, codes
    within its codebook), else the IDs would be written and then dropped by the loader. Checked before any data
    is read."""
    levels, codes = model.schema.sid_levels, model.schema.sid_codebook
    if rq_cfg is None:
        return RQVAEConfig(num_quantizers=levels, codebook_size=codes, device=cfg.device)
    if rq_cfg.num_quantizers != levels or rq_cfg.codebook_size > codes:
        raise CliError(f"--num_quantizers {rq_cfg.num_quantizers} --codebook_size {rq_cfg.codebook_size}: the "
                       f"checkpoint's model reads {levels}-level semantic IDs of at most {codes} codes")
    return rq_cfg


def _bootstrap(cfg: InferConfig, d: shard.Dist, ds: TestDataset, result_dir: Path, ck: Checkpoint,
               rq_cfg: RQVAEConfig) -> dict:
    """The semantic-ID bootstrap; under torchrun rank 0 makes the IDs (once, under the lock) while the others
    wait, then load what it wrote, or degrade as it did: every rank serves the same IDs and reports rank 0's
    status."""
    rq, feats, trained_ids = ck.rqvae, ck.rqvae_features, ck.trained_ids
    if d.lead:
        boot = ensure_semantic_ids(ds, result_dir, rq, feats, trained_ids, cfg.allow_semantic_generation,
                                   cfg.mm_emb_id, rq_cfg)
        info = {**asdict(boot), "status": boot.status.value}
        rep_path = Path(boot.path).parent / "semantic_id_report.json" if boot.path else None
        if cfg.plot and not boot.generation.get("levels"):  # nothing new was encoded: nothing to draw
            log.info("--plot: no semantic IDs were made in this run (status %s): no picture", boot.status.value)
        elif cfg.plot and rep_path is not None and rep_path.is_file():
            from rqvae.plot import plot_report

            try:  # a picture is extra: never the reason a run fails
                info["plot"] = str(plot_report(rep_path))
                log.info("wrote %s", info["plot"])
            except (OSError, ValueError) as e:
                log.warning("no semantic-ID picture: %s", e)
    info = shard.broadcast_object(d, info if d.lead else None)
    if not d.lead:
        ds.rebuild()  # whatever rank 0 wrote
        mine = ensure_semantic_ids(ds, result_dir, rq, feats, trained_ids, False, cfg.mm_emb_id, rq_cfg)
        if mine.items != info.get("items"):
            log.warning("rank %d serves %d semantic IDs, rank 0 %d", d.rank, mine.items, info.get("items"))
        info = {**info, "local_status": mine.status.value}
    return info


def evaluate(top10s: list[list[int]], users: list[str], labels_path: str, warm: set) -> dict:
    """Metrics of each user's next click or conversion, overall and on cold-start targets (items never seen in
    training); a conversion weighs 2.5. Labels of another action (an exposure) are no target and are left out."""
    labels = load_labels(labels_path)
    scored = {u: v for u, v in labels.items() if is_target(v[1])}
    if len(scored) < len(labels):
        log.warning("%s: %d labels are neither a click (1) nor a conversion (2): not scored", labels_path,
                    len(labels) - len(scored))
    have = [i for i, u in enumerate(users) if u in scored]
    targets = [scored[users[i]][0] for i in have]
    weights = target_weights([scored[users[i]][1] for i in have])
    ranks = ranks_in_topk([top10s[i] for i in have], targets)
    cold = np.asarray([t not in warm for t in targets], bool)
    return {"overall": rank_metrics(ranks, weights), "cold_start": rank_metrics(ranks[cold], weights[cold]),
            "warm": rank_metrics(ranks[~cold], weights[~cold])}


def infer(args: argparse.Namespace | None = None) -> tuple[list[list[int]], list[str]]:
    """The competition entry point: (top10s, user_list), raw creative ids and raw user ids."""
    args = args if args is not None else parse_args([])
    top10s, users, _ = run(InferConfig.from_env_and_args(args), from_namespace(RQVAEConfig, args))
    return top10s, users


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args)
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    cfg = InferConfig.from_env_and_args(args)
    rq_cfg = from_namespace(RQVAEConfig, args)  # impossible settings: one line, exit 2, before any work
    t0 = time.perf_counter()
    try:
        top10s, users, report = run(cfg, rq_cfg)
    finally:
        rdist.close()
    if report.get("rank", 0) != 0:
        return 0  # rank 0 writes the files
    result_dir = Path(report["result_dir"])  # run() resolved it (the demo's, when no paths are set)
    sh = report.get("shard")
    name, rep_name = (shard.shard_file(sh["shard_id"], sh["num_shards"]),
                      shard.shard_file(sh["shard_id"], sh["num_shards"], "infer_report")) if sh \
        else (RESULT_FILE, REPORT_FILE)
    result = {"time": round(time.perf_counter() - t0, 3), "top10s": top10s, "user": users}
    if sh:
        result.update(sh)
    write_json(result_dir / name, result, compact=True)
    write_json(result_dir / rep_name, report)
    log.info("wrote %s and %s (%d users)", result_dir / name, result_dir / rep_name, len(users))
    # The summary, on stdout (logs go to stderr).
    sid = report.get("semantic_id", {})
    ranks = f" on {report['world_size']} ranks" if report.get("world_size", 1) > 1 else ""
    print(f"{len(users)} users x {report['candidates']} candidates in {report['seconds']['total']:.1f} s{ranks}; "
          f"semantic IDs: {sid.get('status', '?')}; history filtering {'on' if report['filter_seen'] else 'off'}")
    ta = report.get("target_actions", {})
    if "error" in ta:
        print("user_action_type.json not used (unreadable): every target taken as a click")
    elif ta.get("file"):
        print(f"queries conditioned on user_action_type.json: {ta['conversions']} conversions, {ta['clicks']} clicks")
    for mname, m in report.get("metrics", {}).items():
        print(f"  {mname:10s} HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  score {m['score']:.4f}  ({m['users']} users)")
    print(f"results: {result_dir / name}\nreport:  {result_dir / rep_name}")
    if sh:
        print(f"shard {sh['shard_id']} of {sh['num_shards']}: merge all shards with "
              f"python -m evalu.shard --result_dir {result_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
