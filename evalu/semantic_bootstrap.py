"""The lazy semantic-ID bootstrap of inference: load the IDs, or make them, or go on without them.

Order: IDs found (data dir, then the results dir) that belong to the checkpoint (not made by another RQ-VAE, and
agreeing with its trained IDs on the items they share) -> "loaded semantic_id for N items", and candidates they miss
are encoded with the checkpoint's RQ-VAE; only another model's IDs found -> warning, encode with the
checkpoint's RQ-VAE into the results dir ("replaced"); none found -> "no semantic_id found, trying to
generate..." -> encode with the checkpoint's RQ-VAE (seconds) or, without one, train a new one -> save ->
rebuild the dataset -> "generated semantic_id for N items". The checkpoint's own trained IDs are always served
for its training items. A failure degradation is for (I/O, bad data, out of memory, no IDs could be made) is a
warning and inference goes on (trained IDs, else default IDs), its traceback in the log at DEBUG; anything else
is a bug and surfaces.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import torch

from dataset import TestDataset, load_mm_emb
from dataset.semantic_ids import read_origin
from genrec.core.lock import file_lock
from genrec.core.safeio import DataFormatError, is_writable_dir
from rqvae import RQVAE, RQVAEConfig, generate_semantic_ids

log = logging.getLogger(__name__)


class Status(str, Enum):
    """How the bootstrap got the IDs it serves (the value is what infer_report.json says)."""

    LOADED = "loaded"  # a file that belongs to the checkpoint
    LOADED_ENCODED = "loaded+encoded"  # that, plus candidates it missed, encoded with the checkpoint's RQ-VAE
    ENCODED = "encoded"  # no file: every item encoded with the checkpoint's RQ-VAE
    TRAINED = "trained"  # no file and no RQ-VAE in the checkpoint: a new one trained
    REPLACED = "replaced"  # only another model's file: ours encoded into the results dir instead
    CHECKPOINT = "checkpoint"  # no usable file and no way to make one: the checkpoint's own IDs only
    DISABLED = "disabled"  # ALLOW_SEMANTIC_GENERATION=false and no usable file
    FAILED = "failed"  # making IDs failed (I/O, bad data, out of memory): the checkpoint's IDs, else none
    UNUSED = "unused"  # the model takes no semantic IDs

    def __str__(self) -> str:
        return self.value


class GenerationError(RuntimeError):
    """No semantic IDs could be made from the data (no usable embedding, nothing written)."""


# The failures the bootstrap degrades on; any other exception is a bug and propagates.
DEGRADE = (OSError, DataFormatError, MemoryError, torch.cuda.OutOfMemoryError, GenerationError)


@dataclass
class BootstrapResult:
    status: Status = Status.UNUSED
    items: int = 0
    coverage_before: float = 0.0
    coverage_after: float = 0.0
    path: str | None = None
    warning: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # IDs files not used (another model's), and why


LOCK_FILE = ".semantic_id_dict.json.lock"


def _file_lock(folder: Path) -> ContextManager[None]:
    """Exclusive lock beside the IDs file, so two processes never generate into the same folder at once (waits
    at most $GENREC_LOCK_TIMEOUT seconds, then the bootstrap degrades)."""
    return file_lock(folder / LOCK_FILE, "generating semantic IDs")


def _output_dir(ds: TestDataset, result_dir: Path) -> Path:
    if is_writable_dir(ds.data_dir):
        return ds.data_dir
    log.warning("data dir %s is read-only: semantic IDs go to %s", ds.data_dir, result_dir)
    return result_dir


def id_file_check(rqvae: RQVAE | None, trained_ids: Mapping[int, list[int]]
                  ) -> Callable[[Path, dict[int, list[int]]], str | None]:
    """The test an IDs file must pass to be served with a checkpoint (TestDataset's `sid_accept`): not made by
    another RQ-VAE (the fingerprint in the report beside the file), and agreeing with the IDs the model was
    trained with on every item they share (a file of unknown origin must share some). Returns why a file fails,
    or None."""
    fingerprint = rqvae.fingerprint() if rqvae is not None else None

    def check(path: Path, ids: dict[int, list[int]]) -> str | None:
        origin = read_origin(path)
        known = origin is not None and fingerprint is not None
        if known and origin != fingerprint:
            return f"made by another RQ-VAE (fingerprint {origin}; the checkpoint's is {fingerprint})"
        if not trained_ids:
            return None  # nothing to compare with: the model was trained without IDs of its own
        shared = [c for c in trained_ids if c in ids]
        if not shared and not known:
            return "of unknown origin and shares no item with the checkpoint's IDs"
        wrong = sum(ids[c] != list(trained_ids[c]) for c in shared)
        if wrong:  # even under the right fingerprint: the codes themselves must agree
            return f"{'made by the checkpoint' + chr(39) + 's RQ-VAE' if known else 'of unknown origin'} but " \
                   f"disagrees with the checkpoint's IDs on {wrong} of {len(shared)} items"
        return None

    return check


def _reload_from(ds: TestDataset, folder: Path) -> None:
    """Look for the IDs file in `folder` first from now on, and reload it."""
    ds.sid_dirs = [folder, *[d for d in ds.sid_dirs if d != folder]]
    ds.rebuild()


def _serve_trained(ds: TestDataset, trained_ids: Mapping[int, list[int]]) -> None:
    """Serve the checkpoint's own IDs for the items it was trained with (and whatever accepted file adds)."""
    missing = {c: list(v) for c, v in trained_ids.items() if c not in ds.semantic_id_dict}
    if missing:
        ds.semantic_id_dict = {**ds.semantic_id_dict, **missing}
    ds.store.attach_semantic_ids(ds.semantic_id_dict)


def ensure_semantic_ids(ds: TestDataset, result_dir: Path, rqvae: RQVAE | None, rqvae_features: list[str] | None,
                        trained_ids: dict[int, list[int]], allow_generation: bool, mm_emb_id: list[str] | None,
                        cfg: RQVAEConfig | None = None) -> BootstrapResult:
    res = BootstrapResult(coverage_before=ds.semantic_id_coverage)
    feats = rqvae_features if rqvae is not None else (mm_emb_id or ["81"])
    if rqvae is not None and mm_emb_id and [str(m) for m in mm_emb_id] != list(rqvae_features or []):
        log.warning("--mm_emb_id %s ignored: the checkpoint's RQ-VAE was trained on %s", mm_emb_id, rqvae_features)
    cfg = cfg if cfg is not None else RQVAEConfig()
    for path, why in ds.semantic_id_rejected:
        log.warning("%s not used: %s", path, why)
    res.rejected = {str(p): why for p, why in ds.semantic_id_rejected}
    try:
        if ds.semantic_id_dict:
            res.status = Status.LOADED
            log.info("loaded semantic_id for %d items", len(ds.semantic_id_dict))
            missing = _candidates_missing(ds, feats) if rqvae is not None and allow_generation else 0
            if missing and rqvae is not None and allow_generation:
                # The file passed the origin check, so extending it keeps one codebook.
                log.info("%d candidate items have no semantic_id: encoding them with the checkpoint's RQ-VAE", missing)
                out = ds.semantic_id_path.parent if is_writable_dir(ds.semantic_id_path.parent) else _output_dir(ds, result_dir)
                with _file_lock(out):
                    _, _, rep = generate_semantic_ids(ds.data_dir, feats, cfg, rqvae, ds.semantic_id_dict, out)
                _reload_from(ds, out)
                res.status, res.generation = Status.LOADED_ENCODED, rep
        elif ds.semantic_id_rejected and rqvae is not None and allow_generation:
            # Another model's IDs: make ours with the checkpoint's RQ-VAE, in the results dir (never over the
            # other file, which belongs to someone else).
            log.warning("encoding the items with the checkpoint's RQ-VAE into %s instead", result_dir)
            with _file_lock(result_dir):
                sids, _, rep = generate_semantic_ids(ds.data_dir, feats, cfg, rqvae, trained_ids, result_dir)
            if not sids:
                raise GenerationError(rep.get("error", "no semantic IDs could be generated"))
            _reload_from(ds, result_dir)
            res.status, res.generation = Status.REPLACED, rep
        elif not allow_generation or ds.semantic_id_rejected or (rqvae is None and trained_ids):
            # Without the checkpoint's RQ-VAE, new codes would come from another codebook: serve what it has.
            res.status = Status.DISABLED if not allow_generation else Status.CHECKPOINT
            why = ("ALLOW_SEMANTIC_GENERATION=false and no usable semantic_id_dict.json" if not allow_generation
                   else "no usable semantic_id_dict.json and no RQ-VAE in the checkpoint to make one")
            res.warning = f"{why}: serving the checkpoint's IDs for the {len(trained_ids)} items it was trained with" \
                if trained_ids else f"{why}: running without semantic IDs"
            log.warning(res.warning)
        else:
            if ds.semantic_id_error:
                log.warning("existing semantic_id_dict.json is corrupt (%s): regenerating", ds.semantic_id_error)
            log.info("no semantic_id found, trying to generate...")
            out = _output_dir(ds, result_dir)
            with _file_lock(out):
                _reload_from(ds, out)  # another process may have written it while we waited for the lock
                if ds.semantic_id_dict:
                    res.status = Status.LOADED
                    log.info("loaded semantic_id for %d items (written by another process)", len(ds.semantic_id_dict))
                else:
                    if rqvae is None:
                        log.warning("the checkpoint carries no RQ-VAE: training a new one; its IDs will not match "
                                    "the ones the model was trained with")
                    sids, _, rep = generate_semantic_ids(ds.data_dir, feats, cfg, rqvae, trained_ids, out)
                    res.generation = rep
                    if not sids:
                        raise GenerationError(rep.get("error", "no semantic IDs could be generated"))
                    ds.rebuild()
                    res.status = Status.ENCODED if rqvae is not None else Status.TRAINED
                    made = len(ds.semantic_id_dict) - int(rep.get("reused_ids", 0))
                    log.info("generated semantic_id for %d items (%d newly made, %d reused from the checkpoint)",
                             len(ds.semantic_id_dict), made, int(rep.get("reused_ids", 0)))
        _serve_trained(ds, trained_ids)  # whichever way the IDs came: the training items keep their own
    except DEGRADE as e:  # inference works without (new) semantic IDs
        res.status = Status.FAILED
        served = f"serving the checkpoint's IDs for the {len(trained_ids)} items it was trained with" \
            if trained_ids else "continuing with default semantic IDs"
        res.warning = f"semantic ID generation failed ({type(e).__name__}: {e}); {served}"
        log.warning(res.warning)
        log.debug("the failure's traceback", exc_info=True)
        _serve_trained(ds, trained_ids)
    res.items = len(ds.semantic_id_dict)
    res.path = str(ds.semantic_id_path) if ds.semantic_id_path else None
    res.coverage_after = ds.semantic_id_coverage
    log.info("semantic_id coverage of items: %.1f%% before, %.1f%% after", 100 * res.coverage_before,
             100 * res.coverage_after)
    return res


def _candidates_missing(ds: TestDataset, feats: list[str]) -> int:
    """Candidates without a semantic ID that have an embedding to encode (the others cannot get one)."""
    cids = ds.store.creative[ds.candidate_slots[ds.store.sid[ds.candidate_slots, 0] == 0]]
    if not len(cids):
        return 0
    has = np.zeros(len(cids), bool)
    for emb in load_mm_emb(ds.data_dir / "creative_emb", feats).values():
        has |= emb.rows(cids) >= 0
    return int(has.sum())
