"""From `creative_emb/` to `semantic_id_dict.json`: load features, merge them, train (or reuse) a model,
encode every item, optionally dedup, write the IDs and a report."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from dataset.files import load_indexer
from dataset.mm_emb import MAX_ABS, MMEmbedding, load_mm_emb
from dataset.semantic_ids import REPORT_FILE, SEMANTIC_ID_FILE, origin_record, save_semantic_ids
from genrec.core import dist as rdist
from genrec.core.device import peak_memory_mb
from genrec.core.safeio import DataFormatError, is_writable_dir, write_json

from .config import RQVAEConfig
from .dedup import dedup_codes
from .fit import encode, fit
from .model import RQVAE
from .stats import collision_stats, level_stats

log = logging.getLogger(__name__)


def merge_features(feats: Mapping[str, MMEmbedding]) -> tuple[np.ndarray, np.ndarray]:
    """(creative ids [N], matrix [N, D]) over the union of items. Same dims: the mean of the features an item
    has. Different dims: each feature L2-normalised, blocks concatenated, zeros where an item lacks one."""
    feats = [f for f in feats.values() if len(f)]
    if not feats:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    if len(feats) == 1:
        f = feats[0]
        ids, first = np.unique(f.ids, return_index=True)
        return ids, (np.asarray(f.emb) if len(first) == len(f.ids) and np.all(first[1:] > first[:-1])
                     else np.asarray(f.emb)[first])
    ids = np.unique(np.concatenate([f.ids for f in feats]))
    same = len({f.dim for f in feats}) == 1
    width = feats[0].dim if same else sum(f.dim for f in feats)
    out = np.zeros((len(ids), width), np.float32)
    count = np.zeros(len(ids), np.float32)
    col = 0
    for f in feats:
        pos = np.searchsorted(ids, f.ids)
        for lo in range(0, len(f.ids), 65536):
            rows = np.asarray(f.emb[lo:lo + 65536], np.float32)
            p = pos[lo:lo + 65536]
            if same:
                out[p] += rows
            else:
                out[p, col:col + f.dim] = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        count[pos] += 1
        col += 0 if same else f.dim
    if same:
        out /= np.maximum(count, 1)[:, None]
    return ids, out


def _usable_rows(x: np.ndarray) -> np.ndarray:
    """Rows that are finite, within MAX_ABS and not all zero."""
    ok = np.ones(len(x), bool)
    for lo in range(0, len(x), 65536):
        b = np.abs(np.asarray(x[lo:lo + 65536]))
        ok[lo:lo + 65536] = (b <= MAX_ABS).all(1) & (b.sum(1) > 0)  # b <= MAX_ABS is False for NaN and inf
    return ok


def build_semantic_ids(ids: np.ndarray, x: np.ndarray, cfg: RQVAEConfig, model: RQVAE | None = None,
                       data_parallel: bool = False) -> tuple[dict[int, list[int]], RQVAE, dict]:
    """Train (unless `model` is given), encode and (optionally) dedup. Returns (ids dict, model, report).
    `data_parallel`: every rank of a torchrun job calls this with the same rows; training and encoding are
    shared, and every rank returns the same IDs."""
    t0 = time.perf_counter()
    ok = _usable_rows(x)
    skipped = int((~ok).sum())
    if skipped:
        log.warning("skipping %d items whose embedding is all zero or not finite", skipped)
        ids, x = ids[ok], x[ok]
    if len(ids) == 0:
        raise DataFormatError("no usable embeddings (every row all zero, not finite or beyond the value bound)")
    report: dict[str, Any] = {"items": int(len(ids)), "dim": int(x.shape[1]), "skipped_bad_rows": skipped}
    if model is None:
        model, fit_report = fit(x, cfg, data_parallel=data_parallel)
        report["fit"] = fit_report
        report["source"] = "trained"
    else:
        report["source"] = "encoded with existing model"
    t1 = time.perf_counter()
    if data_parallel and rdist.world() > 1:  # each rank encodes its share, all gather everything
        mine = rdist.my_slice(len(x))
        c, r = encode(model, x[mine], return_residual=True)
        codes = rdist.gather_rows(torch.as_tensor(c)).numpy()
        last_r = rdist.gather_rows(torch.as_tensor(r)).numpy()
    else:
        codes, last_r = encode(model, x, return_residual=True)
    t2 = time.perf_counter()
    report["collisions_before_dedup"] = collision_stats(codes)
    if cfg.dedup:
        last_cb = model.quantizer.codebooks[-1].detach().cpu().numpy()
        codes, info = dedup_codes(codes, last_r, last_cb)
        report["dedup"] = info
        if info["unresolved"]:
            log.warning("dedup: %d items still share an ID (their 3-code prefix has no free last code)", info["unresolved"])
    del last_r
    K = model.cfg.codebook_size
    report.update(collision_stats(codes))
    report["levels"] = level_stats(codes, K)
    report["seconds"] = {"train": round(t1 - t0, 3), "encode": round(t2 - t1, 3),
                         "dedup": round(time.perf_counter() - t2, 3)}
    report["memory"] = peak_memory_mb()
    sids = {int(c): row for c, row in zip(ids.tolist(), codes.tolist())}
    return sids, model, report


def generate_semantic_ids(data_path: str | os.PathLike, mm_emb_ids: Iterable[str], cfg: RQVAEConfig | None = None,
                          model: RQVAE | None = None, known: Mapping[int, list[int]] | None = None,
                          output_dir: str | os.PathLike | None = None, data_parallel: bool = False
                          ) -> tuple[dict[int, list[int]], RQVAE | None, dict]:
    """The work behind generate_semantic_ids_on_demand; also returns the model and the report.

    With `model`, items are encoded with it (no training). Items in `known` keep their IDs and are not encoded
    again (IDs a checkpoint was trained with stay exactly as they were). `data_parallel`: every rank of a
    torchrun job calls this; they share training and encoding, rank 0 alone writes, all return the same IDs."""
    data_path = Path(data_path)
    cfg = cfg or RQVAEConfig()
    out = Path(output_dir) if output_dir else data_path
    if not is_writable_dir(out):
        raise PermissionError(f"cannot write semantic IDs: folder {out} is not writable")
    t0 = time.perf_counter()
    mm_emb_ids = [str(m) for m in mm_emb_ids]
    feats = load_mm_emb(data_path / "creative_emb", mm_emb_ids)
    t_load = time.perf_counter() - t0
    if not feats:
        log.warning("no semantic IDs generated: none of the multimodal features %s could be loaded from %s",
                    mm_emb_ids, data_path / "creative_emb")
        return {}, model, {"items": 0, "error": "no multimodal feature could be loaded"}
    ids, x = merge_features(feats)
    if not len(ids):
        skipped = {f: e.skipped for f, e in feats.items() if e.skipped}
        log.warning("no semantic IDs generated: the multimodal features %s hold no usable row%s", list(feats),
                    f" (skipped: {skipped})" if skipped else " (empty part files)")
        return {}, model, {"items": 0, "error": f"features {list(feats)} hold no usable embedding row"}
    log.info("got %d items' multimodal features, dim %d", len(ids), x.shape[1])
    if model is not None and x.shape[1] != model.in_dim:
        raise DataFormatError(f"the RQ-VAE expects {model.in_dim}-d input; features {list(feats)} of {data_path} "
                              f"merge to {x.shape[1]}-d")
    known = dict(known or {})
    if known:
        todo = ~np.isin(ids, np.fromiter(known.keys(), np.int64, len(known)))
        ids, x = ids[todo], x[todo]
    if len(ids):
        sids, model, report = build_semantic_ids(ids, x, cfg, model, data_parallel)
    else:
        sids, report = {}, {"items": 0, "source": "every item with an embedding already had an ID"}
    del x
    report["reused_ids"] = len(known)
    sids.update(known)
    report["features"] = {f: {"items": len(e), "dim": e.dim, "skipped": e.skipped} for f, e in feats.items()}
    report.setdefault("seconds", {})["load"] = round(t_load, 3)
    report.update(_coverage(data_path, np.fromiter(sids.keys(), np.int64, len(sids))))
    log.info("generated semantic_id for %d items (%d newly made, %d reused)", len(sids), len(sids) - len(known),
             len(known))
    path = out / SEMANTIC_ID_FILE
    report["world_size"] = rdist.world() if data_parallel else 1
    if rdist.is_lead() or not data_parallel:  # one writer
        save_semantic_ids(path, sids)
        report["origin"] = origin_record(path, model.fingerprint() if model is not None else None)
        write_json(out / REPORT_FILE, report)
        log.info("saved semantic_id to %s", path)
    if data_parallel:
        rdist.barrier()  # the files exist for every rank once this returns
    if "collision_rate" in report:
        log.info("semantic ID report: %d items, collision rate %.4f, largest group %d, codes used per level %s",
                 report["items"], report["collision_rate"], report["largest_group"],
                 [lv["used"] for lv in report["levels"]])
    return sids, model, report


def generate_semantic_ids_on_demand(data_path: str | os.PathLike, mm_emb_ids: Iterable[str],
                                    cfg: RQVAEConfig | None = None,
                                    model: RQVAE | None = None, output_dir: str | os.PathLike | None = None,
                                    model_dir: str | os.PathLike | None = None,
                                    known: Mapping[int, list[int]] | None = None,
                                    data_parallel: bool = False) -> dict[int, list[int]]:
    """Load the listed creative_emb features of `data_path`, merge, train (or encode with `model`), write
    `semantic_id_dict.json` + `semantic_id_report.json` into `output_dir` (default: `data_path`) and return the IDs.
    Returns {} with a warning naming the cause when no feature can be loaded. Raises PermissionError before any
    training when the output folder is not writable."""
    cfg = cfg if cfg is not None else RQVAEConfig()
    sids, model, _ = generate_semantic_ids(data_path, mm_emb_ids, cfg, model, known, output_dir, data_parallel)
    if model_dir is not None and model is not None and sids and (rdist.is_lead() or not data_parallel):
        model.save(model_dir)
    return sids


def _coverage(data_path: Path, ids: np.ndarray) -> dict:
    """Training items (indexer) that got no ID because no requested feature covers them."""
    idx_path = data_path / "indexer.pkl"
    if not idx_path.is_file():
        return {}
    known = np.fromiter(load_indexer(idx_path)["i"].keys(), np.int64)
    covered = np.isin(known, ids)
    return {"indexed_items": int(len(known)), "indexed_items_without_feature": int((~covered).sum()),
            "coverage": float(covered.mean()) if len(known) else 0.0}
