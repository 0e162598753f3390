"""`semantic_id_dict.json`: {"<creative_id>": [c1, c2, c3, c4]}, read back with int keys and checked entry by entry."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

from genrec.core.safeio import DataFormatError, fits_int64, write_json

log = logging.getLogger(__name__)

SEMANTIC_ID_FILE = "semantic_id_dict.json"
REPORT_FILE = "semantic_id_report.json"  # beside it: how the IDs were made, and by which RQ-VAE (origin)


class CorruptSemanticIdFile(DataFormatError):
    """The file exists but is empty, truncated or not a JSON object."""


def load_semantic_ids(path: str | os.PathLike, num_levels: int = 4,
                      codebook_size: int = 256) -> tuple[dict[int, list[int]], int]:
    """Valid entries (int creative id -> codes) and the number of invalid entries, which are never used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptSemanticIdFile(f"{path}: not UTF-8 text: {e}") from e
    if not text.strip():
        raise CorruptSemanticIdFile(f"{path}: empty file")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's limit
        raise CorruptSemanticIdFile(f"{path}: not valid JSON (truncated?): {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise CorruptSemanticIdFile(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out: dict[int, list[int]] = {}
    invalid = 0
    for k, v in raw.items():
        try:
            cid = int(k)
        except ValueError:
            invalid += 1
            continue
        if not fits_int64(cid):
            invalid += 1
            continue
        if (isinstance(v, list) and len(v) == num_levels
                and all(type(c) is int and 0 <= c < codebook_size for c in v)):
            out[cid] = v
        else:
            invalid += 1
    if invalid:
        log.warning("%s: %d invalid entries ignored (want %d ints in [0, %d) per item)",
                    path, invalid, num_levels, codebook_size)
    return out, invalid


def save_semantic_ids(path: str | os.PathLike, sids: Mapping[int, list[int]]) -> None:
    """Atomic, compact, keys as strings in ascending creative-id order (identical input -> identical bytes)."""
    write_json(path, {str(k): [int(c) for c in sids[k]] for k in sorted(sids)}, compact=True)


def find_semantic_id_file(*dirs: str | os.PathLike | None) -> Path | None:
    """The first `semantic_id_dict.json` among `dirs` (data dir first, then fallbacks)."""
    for d in dirs:
        if d is not None and (Path(d) / SEMANTIC_ID_FILE).is_file():
            return Path(d) / SEMANTIC_ID_FILE
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def origin_record(path: str | os.PathLike, rqvae_fingerprint: str | None) -> dict:
    """What the writer puts in the report beside `path`: the RQ-VAE that made the IDs, and the file's hash (so a
    report left beside another file never vouches for it)."""
    return {"rqvae_fingerprint": rqvae_fingerprint, "ids_sha256": file_sha256(path)}


def read_origin(path: str | os.PathLike) -> str | None:
    """The fingerprint of the RQ-VAE that made the IDs file `path`, from the report beside it; None when unknown
    (no report, no origin in it, or a report written for other contents of the file)."""
    rep = Path(path).with_name(REPORT_FILE)
    try:
        origin = json.loads(rep.read_text(encoding="utf-8")).get("origin") or {}
        if origin.get("ids_sha256") == file_sha256(path):
            fp = origin.get("rqvae_fingerprint")
            return str(fp) if fp else None
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    return None
