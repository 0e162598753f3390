"""Random access to a sequence .jsonl through its byte-offsets pickle (one user per line)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from genrec.core.safeio import DataFormatError, load_pickle

log = logging.getLogger(__name__)


def scan_offsets(path: str | os.PathLike) -> np.ndarray:
    """Byte offset of every non-empty line of `path`."""
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _as_offsets(obj: Any, path: Path) -> np.ndarray:
    if isinstance(obj, dict):  # {line_no: offset}
        try:
            return np.asarray([obj[k] for k in sorted(obj)], dtype=np.int64)
        except (TypeError, ValueError, OverflowError, KeyError) as e:
            raise DataFormatError(f"{path}: offsets dict is not {{int: int}}: {e!r}") from e
    try:
        arr = np.asarray(obj, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataFormatError(f"{path}: offsets are not a list of ints: {e!r}") from e
    if arr.ndim != 1:
        raise DataFormatError(f"{path}: offsets must be one-dimensional, got shape {arr.shape}")
    return arr


def _stale(offsets: np.ndarray, path: Path) -> str | None:
    """Why `offsets` cannot be the line starts of `path` (None when they fit): out of the file, not increasing,
    not at a line start, or lines after the last one (the file grew since the offsets were written)."""
    size = path.stat().st_size
    if not len(offsets):
        return "no offsets" if size and open(path, "rb").read().strip() else None
    if offsets.min() < 0 or offsets.max() >= size:
        return "offsets point outside the file (stale?)"
    if len(offsets) > 1 and not (np.diff(offsets) > 0).all():
        return "offsets are not increasing (stale?)"
    with open(path, "rb") as f:
        data = np.memmap(f, dtype=np.uint8, mode="r")
        starts = offsets[offsets > 0]
        if len(starts) and not (data[starts - 1] == ord("\n")).all():
            return "an offset is not at a line start (stale?)"
        f.seek(int(offsets[-1]))
        f.readline()
        if f.read().strip():
            return "the file has lines after the last offset (it grew since the offsets were written)"
    return None


class SeqFile:
    """`seq[i]` is the parsed JSON list of line i. Offsets come from `offsets_path`, rebuilt when missing."""

    def __init__(self, path: str | os.PathLike, offsets_path: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sequence file not found: {self.path}")
        offsets_path = Path(offsets_path) if offsets_path else self.path.with_name(self.path.stem + "_offsets.pkl")
        if offsets_path.exists():
            try:
                self.offsets = _as_offsets(load_pickle(offsets_path), offsets_path)
                why = _stale(self.offsets, self.path)
            except DataFormatError as e:  # the offsets can always be derived from the file itself
                why = str(e)
            except OSError as e:  # unreadable (a folder, no permission, an I/O error): the same
                why = f"unreadable ({e.strerror or e})"
            if why:
                log.warning("%s: %s; rebuilding offsets by scanning %s", offsets_path.name, why, self.path.name)
                self.offsets = scan_offsets(self.path)
        else:
            log.warning("%s missing; rebuilding offsets by scanning %s", offsets_path.name, self.path)
            self.offsets = scan_offsets(self.path)
        self._fh = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the file
        state = self.__dict__.copy()
        state["_fh"] = None
        return state

    def line(self, i: int) -> list:
        if self._fh is None or self._pid != os.getpid():  # a forked DataLoader worker must not share our offset
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[i]))
        raw = self._fh.readline()
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's limit
            raise DataFormatError(f"{self.path}: line {i + 1}: malformed JSON: {type(e).__name__}: {e}") from None
        if not isinstance(rec, list) or not all(isinstance(r, list) and len(r) == 6 for r in rec):
            raise DataFormatError(f"{self.path}: line {i + 1}: expected a list of 6-field records")
        return rec

    __getitem__ = line

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
