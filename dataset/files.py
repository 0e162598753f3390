"""Readers for the small files of a competition directory."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genrec.core.safeio import DataFormatError, fits_int64, load_pickle

log = logging.getLogger(__name__)



def load_indexer(path: str | os.PathLike) -> dict:
    """indexer.pkl: {'u': {raw_uid: reid}, 'i': {creative_id: reid}, 'f': {fid: {raw: reid}}}."""
    idx = load_pickle(path)
    if not isinstance(idx, dict) or not all(k in idx for k in ("u", "i", "f")):
        raise DataFormatError(f"{path}: expected a dict with keys 'u', 'i', 'f'")
    return idx


def load_item_feats(path: str | os.PathLike) -> dict[str, dict]:
    """item_feat_dict.json: {str(item_reid): {fid: value}}."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except ValueError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    return d


def load_action_types(path: str | os.PathLike) -> dict[str, Any]:
    """Optional user_action_type.json: {raw_user_id: 1 (click) | 2 (conversion)}; {} when absent. The values are
    returned as read: the caller decides what a value other than 1 or 2 means."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected {{user_id: 1 | 2}}, got a JSON {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


@dataclass
class CandidatePool:
    creative_ids: np.ndarray  # int64 [C]
    retrieval_ids: np.ndarray  # int64 [C]
    features: list[dict[str, Any]]


def load_predict_set(path: str | os.PathLike) -> CandidatePool:
    """predict_set.jsonl: one candidate per line. A bad line (no JSON object, an id that is no int64, features
    that are no dict) or a creative id seen before is skipped and counted, with one warning naming the file and
    the first such line: the pool stays usable, and no item can appear twice in a top-10."""
    path = Path(path)
    cids, rids, feats = [], [], []
    seen: set[int] = set()
    skipped: dict[str, int] = {}
    first_bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                cid = int(obj["creative_id"])
                rid = int(obj.get("retrieval_id", len(rids)))
                feat = obj.get("features") or {}
                if not (fits_int64(cid) and fits_int64(rid)) or not isinstance(feat, dict):
                    raise ValueError("id beyond int64 or features not an object")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                skipped["unreadable"] = skipped.get("unreadable", 0) + 1
                first_bad = first_bad or n
                continue
            if cid in seen:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                first_bad = first_bad or n
                continue
            seen.add(cid)
            cids.append(cid)
            rids.append(rid)
            feats.append(feat)
    if skipped:
        log.warning("%s: skipped %d candidate lines (%s; first at line %d)", path, sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), first_bad)
    return CandidatePool(np.asarray(cids, np.int64), np.asarray(rids, np.int64), feats)


def load_labels(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Labels (ours, for metrics): one {"user_id", "creative_id", "action_type"} per line -> {user: (cid, action)}."""
    path = Path(path)
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out[str(obj["user_id"])] = (int(obj["creative_id"]), int(obj.get("action_type", 1)))
            except (ValueError, KeyError, TypeError) as e:
                raise DataFormatError(f"{path}: line {n}: bad label: {e!r}") from e
    return out
