"""Multimodal embeddings (`creative_emb/`): one float32 matrix + one int64 id array per feature, cached on disk.

The first load parses the JSON-lines part files a chunk at a time without a per-line `json.loads`: with pandas
installed (the `fast` extra), its C CSV reader parses the chunk once the JSON scaffolding is deleted (about 6x
faster than Python's float(), the same float32 values); else one str.split and float() per number. Rows stream
into a raw binary cache, and later loads memory-map that cache. The cache is valid while every source file keeps
its size, mtime, inode and ctime (a rewrite that restores size and mtime still changes the ctime).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from genrec.core.cli import env_bool, progress_disabled
from genrec.core.safeio import (DataFormatError, PendingArray, atomic_open, cache_root, finish_pickle, fits_int64,
                                is_writable_dir, load_pickle, write_json)

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: the source signature holds inode and ctime; 3: rows with |value| > MAX_ABS skipped
MAX_ABS = 1e6  # an embedding value beyond this is garbage (real features are within a few units): its row is skipped
_CHUNK_BYTES = 16 << 20
_NAME_RE = re.compile(r"^emb_(\w+?)_(\d+)(\.pkl)?$")


@dataclass
class MMEmbedding:
    """Embeddings of one feature: row i of `emb` belongs to creative id `ids[i]`."""

    fid: str
    ids: np.ndarray  # int64 [N]
    emb: np.ndarray  # float32 [N, dim], possibly a read-only memmap
    skipped: dict = field(default_factory=dict)  # reason -> count
    _order: np.ndarray | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, creative_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Row of each creative id, -1 where the feature has no embedding for it."""
        q = np.asarray(creative_ids, dtype=np.int64)
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._order]
        pos = np.searchsorted(sorted_ids, q).clip(0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0:
            return np.full(q.shape, -1, dtype=np.int64)
        hit = sorted_ids[pos] == q
        return np.where(hit, self._order[pos], -1)


def find_feature_source(emb_dir: Path, fid: str, dim: int | None = None) -> tuple[Path, int] | None:
    """The file or folder holding feature `fid` and the dimension its name carries (`emb_{fid}_{dim}`). With
    several candidates (`emb_81_16.pkl` beside `emb_81_32/`), the one of dimension `dim` (what a checkpoint
    expects); without `dim`, or with two of that dimension, it is a DataFormatError naming them."""
    if not emb_dir.is_dir():
        return None
    found = []
    for p in sorted(emb_dir.iterdir()):
        m = _NAME_RE.match(p.name)
        if m and m.group(1) == str(fid) and (p.is_dir() or (m.group(3) and p.is_file())):
            found.append((p, int(m.group(2))))
    if dim is not None and len(found) > 1:
        found = [f for f in found if f[1] == int(dim)] or found
    if len(found) > 1:
        raise DataFormatError(f"{emb_dir}: feature {fid} has {len(found)} sources ("
                              f"{', '.join(f'{p.name}: {d}-d' for p, d in found)}); keep one")
    return found[0] if found else None


def _part_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and (p.suffix in (".json", ".jsonl") or p.name.startswith("part-"))
    )


def _parse_rows_slow(lines: list[str], dim: int, skipped: dict) -> tuple[list[int], list[np.ndarray]]:
    ids, rows = [], []
    limit = max_line_bytes(dim)
    for line in lines:
        if not line.strip():
            continue
        if len(line) > limit:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        try:
            obj = json.loads(line)
            cid = int(obj["anonymous_cid"])
            if not fits_int64(cid):
                raise ValueError("id beyond int64")
            vec = np.asarray(obj["emb"], dtype=np.float32)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # RecursionError: nested 100k deep
            skipped["unparseable"] = skipped.get("unparseable", 0) + 1
            continue
        if vec.shape != (dim,):
            skipped["wrong_length"] = skipped.get("wrong_length", 0) + 1
            continue
        ids.append(cid)
        rows.append(vec)
    return ids, rows


_LAYOUT_RE = re.compile(r'^(\{\s*"anonymous_cid"\s*:\s*)-?\d+(\s*,\s*"emb"\s*:\s*\[)[^\]\n]*(\]\s*\})\s*$')


def _fast_parse(text: str, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """All lines in the first line's layout, `dim` finite-or-not numbers each: strip the JSON scaffolding with
    str.replace, split once, convert with float(). None when any line breaks the pattern."""
    text = text.rstrip("\n")
    first = text[:text.find("\n")] if "\n" in text else text
    m = _LAYOUT_RE.match(first.rstrip("\r"))
    if m is None:
        return None
    prefix, mid, suffix = m.groups()
    body = text.replace("\r", "").replace(prefix, "").replace(mid, ",").replace(suffix, "")
    lines = body.split("\n")
    if any(ln.count(",") != dim for ln in lines):  # wrong length, blank line or other layout
        return None
    tokens = ",".join(lines).split(",")
    try:
        ids = np.fromiter(map(int, tokens[::dim + 1]), dtype=np.int64, count=len(lines))
        del tokens[::dim + 1]
        emb = np.fromiter(map(float, tokens), dtype=np.float32, count=len(tokens)).reshape(len(lines), dim)
    except (ValueError, OverflowError):  # a token that is no number (or a cid that is no int64)
        return None
    return ids, emb


@lru_cache(maxsize=1)
def _pandas():
    """pandas when installed (the `fast` extra) and not switched off by GENREC_NO_PANDAS=1, else None."""
    if env_bool("GENREC_NO_PANDAS", False):
        return None
    try:
        import pandas
    except ImportError:
        return None
    return pandas


# The JSON scaffolding of a row, deleted; ':' becomes ',' so a row reads as "anonymous_cid,<id>,emb,<dim numbers>".
_COLON_TO_COMMA = bytes.maketrans(b":", b",")
_SCAFFOLD = b'{}[]" '
_SCAFFOLD_PER_LINE = 8  # { } [ ] and the keys' four quotes


def _words(a: np.ndarray, dtype: str) -> np.ndarray:
    """Every byte position of `a` read as one little-endian word (unaligned loads): comparing a key at n
    positions is then one gather of n words, not a gather of n x len(key) bytes."""
    return np.ndarray((len(a) - np.dtype(dtype).itemsize + 1,), dtype, buffer=a, strides=(1,))


_KEY0 = np.frombuffer(b"anonymous_cid,", "<u8", 1, 0)[0], np.frombuffer(b"anonymous_cid,", "<u8", 1, 6)[0]
_KEY1 = np.frombuffer(b"emb,", "<u4")[0]
_ID_WINDOW = 32  # bytes searched for the comma that ends the id field (an int64 has at most 20 characters)


def _layout_ok(block: bytes, flat: bytes, n: int, dim: int) -> bool:
    """Whether the n rows pandas read from `flat` (= `block` less its scaffolding) are exactly n lines of the
    layout: pandas has checked that every row has at least dim + 3 fields and that fields 1 and 3.. are numbers.
    The totals make each line hold exactly dim + 3 fields and the scaffolding 8 bytes a line (plus spaces); per
    line, field 0 is `anonymous_cid` and field 2 `emb`. Vectorised (CPython's bytes.count of one byte is a scalar
    loop: the block-wide counts took a third of a 32-d chunk)."""
    a = np.frombuffer(flat, np.uint8)
    spaces = int(np.count_nonzero(np.frombuffer(block, np.uint8) == 32))
    if int(np.count_nonzero(a == 44)) != n * (dim + 2) or len(block) - len(flat) != _SCAFFOLD_PER_LINE * n + spaces:
        return False
    starts = np.flatnonzero(a[:-1] == 10) + 1  # every line after the first (a last newline starts none)
    if len(starts) != n - 1:
        return False
    starts = np.concatenate(([0], starts))
    if starts[-1] + 14 + _ID_WINDOW + 8 > len(a):  # room for the last line's windows
        a = np.concatenate((a, np.zeros(14 + _ID_WINDOW + 8, np.uint8)))
    u8 = _words(a, "<u8")
    if not ((u8[starts] == _KEY0[0]) & (u8[starts + 6] == _KEY0[1])).all():
        return False
    ids_at = starts + 14
    window = np.stack([u8[ids_at + k] for k in range(0, _ID_WINDOW, 8)], 1).view(np.uint8) == 44  # [n, 32] bytes
    if not window.any(1).all():
        return False
    return bool((_words(a, "<u4")[ids_at + window.argmax(1) + 1] == _KEY1).all())  # just past the id's comma


def _native_parse(block: bytes, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Every line `{"anonymous_cid": <int>, "emb": [<dim numbers>]}` (any spacing): parse with pandas' C reader.
    None when pandas is absent or any line breaks the layout (blank line, other keys or order, wrong length,
    a token that is no number such as NaN or null, an id beyond int64): the caller then parses line by line.
    The checks run per line but vectorised (`_layout_ok`: about 6 ms of a 15 MiB chunk's 97 at 1024-d)."""
    pd = _pandas()
    if pd is None:
        return None
    flat = block.translate(_COLON_TO_COMMA, _SCAFFOLD)
    if not flat.startswith(b"anonymous_cid,"):
        return None
    cols = [1, *range(3, dim + 3)]
    # pandas < 3 parses floats with its own fast routine unless asked for round-trip accuracy (3 always has it).
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    try:  # one dtype for all columns: a per-column dict costs ~15% at 1024 columns
        df = pd.read_csv(io.BytesIO(flat), header=None, names=range(dim + 3), usecols=cols, index_col=False,
                         dtype=np.float64, na_filter=False, skip_blank_lines=False, engine="c", **exact)
    except (ValueError, OverflowError, TypeError):  # pandas' ParserError is a ValueError
        return None
    table = df.to_numpy(np.float64)  # one float64 block: a transposed view, no copy (iloc[:, 1:] first copied it)
    ids = table[:, 0]
    if not (np.abs(ids) < 2.0**53).all() or not (ids == np.floor(ids)).all():  # beyond float64's exact ints
        return None
    # Every row parsed has at least dim + 3 fields (a short one fails above); _layout_ok checks the rest.
    if not _layout_ok(block, flat, len(df), dim):
        return None
    # C order here, in the worker: the frame's block is column-major
    return ids.astype(np.int64), np.ascontiguousarray(table[:, 1:], dtype=np.float32)


def parse_chunk(text: str, dim: int, skipped: dict) -> tuple[np.ndarray, np.ndarray]:
    """Parse a block of whole JSON lines into (ids, float32 rows); bad rows are skipped and counted."""
    if not text.strip():
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    fast = _fast_parse(text, dim)
    if fast is not None:
        return fast
    # Some line is not in the common layout (or holds a bad number): parse this chunk line by line.
    ids, rows = _parse_rows_slow(text.split("\n"), dim, skipped)
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.asarray(ids, dtype=np.int64), np.stack(rows)


def _ranges(files: list[Path]) -> list[tuple[str, int, int]]:
    """(file, start, end) byte ranges of about _CHUNK_BYTES; the reader aligns them to whole lines."""
    out = []
    for f in files:
        size = f.stat().st_size
        out += [(str(f), lo, min(lo + _CHUNK_BYTES, size)) for lo in range(0, size, _CHUNK_BYTES)]
    return out


def max_line_bytes(dim: int) -> int:
    """Longest line read as a row: far above any real row (about 25 bytes a number), so a corrupt multi-GB line
    is skipped and counted instead of being parsed (15x its size in memory)."""
    return max(1 << 20, 64 * dim + 4096)


def _skip_line(f: Any) -> None:
    """Move past the next newline reading 1 MiB at a time (a line may be larger than memory)."""
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _parse_range(task: tuple[str, int, int, int]) -> tuple[np.ndarray, np.ndarray, dict, int]:
    """Parse the lines that start inside [start, end) of a file: (ids, rows, skipped, bytes). Runs in workers."""
    path, start, end, dim = task
    limit = max_line_bytes(dim)
    skipped: dict = {}
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            _skip_line(f)  # the line holding byte start-1 belongs to the previous range
        pos = f.tell()
        block = f.read(max(end - pos, 0)) if pos < end else b""
        if block and not block.endswith(b"\n"):  # finish the last line that starts inside the range ...
            rest = f.readline(limit + 1)
            if len(rest) > limit or (len(block) - block.rfind(b"\n") - 1) + len(rest) > limit:
                block = block[:block.rfind(b"\n") + 1]  # ... unless it is too long to be a row: skip it
                skipped["too_long"] = skipped.get("too_long", 0) + 1
                if not rest.endswith(b"\n"):
                    _skip_line(f)
            else:
                block += rest
    parsed = _native_parse(block, dim) if block and not block.isspace() else None
    if parsed is None:
        parsed = parse_chunk(block.decode("utf-8", errors="replace"), dim, skipped)
    ids, emb = _drop_nonfinite(*parsed, skipped)
    return ids, emb, skipped, end - start


def _parsed_ranges(tasks: list[tuple[str, int, int, int]]):
    """Results of _parse_range in order; on several cores a process pool parses ahead, a bounded window of
    chunks in flight so memory stays a few chunks, not the whole matrix."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers < 2 or len(tasks) < 2:
        yield from map(_parse_range, tasks)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _pandas()  # imported once here: forked workers inherit it instead of each importing it

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
        pending = [pool.submit(_parse_range, t) for t in tasks[:2 * workers]]
    except (OSError, RuntimeError, MemoryError) as e:  # no process or thread to be had (a memory cap, ulimits)
        log.warning("parse workers cannot start (%s: %s): parsing in this process", type(e).__name__, e)
        if pool is not None:
            _stop(pool)
        yield from map(_parse_range, tasks)
        return
    try:
        nxt = len(pending)
        while pending:
            res = pending.pop(0).result()
            if nxt < len(tasks):
                pending.append(pool.submit(_parse_range, tasks[nxt]))
                nxt += 1
            yield res
    except BaseException:  # Ctrl-C, SIGTERM, a failed chunk, a consumer that stops: the workers stop now
        _stop(pool)
        raise
    pool.shutdown()


def _stop(pool: Any) -> None:
    """End a process pool at once: queued chunks cancelled, running workers terminated (not waited for)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            proc.terminate()
        except (OSError, ValueError, AttributeError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def _worker_init() -> None:
    """A parse worker: Ctrl-C is the loading process's to handle (the terminal sends it to the whole group), a
    SIGTERM ends the worker, and the worker dies with its parent."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()


def _drop_nonfinite(ids: np.ndarray, emb: np.ndarray, skipped: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows with NaN/inf (after the float32 cast) or any |value| above MAX_ABS are skipped and counted: one huge
    value is enough to turn the queries of every user who saw the item into NaN."""
    ok = (np.abs(emb) <= MAX_ABS).all(axis=1)  # False for NaN and inf too: one pass over the chunk
    if not ok.all():
        non_finite = int((~np.isfinite(emb[~ok]).all(axis=1)).sum())  # the bad rows only
        if non_finite:
            skipped["non_finite"] = skipped.get("non_finite", 0) + non_finite
        if int((~ok).sum()) > non_finite:
            skipped["huge"] = skipped.get("huge", 0) + int((~ok).sum()) - non_finite
        return ids[ok], emb[ok]
    return ids, emb


def _pickle_fast(obj: dict, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The common case in one go: int keys, every value one numpy row of `dim` numbers of one type (the
    competition's emb_81_32.pkl): the rows' bytes are joined into the matrix, no array per row is ever built.
    None when any entry differs; the caller then checks entry by entry."""
    vals = list(obj.values())
    if not vals or type(vals[0]) is not PendingArray or not all(type(k) is int for k in obj):
        return None
    try:
        shape, dt, raw0 = vals[0].parts()  # the first row fully checked (dtype plain numeric, sizes) ...
    except pickle.UnpicklingError:
        return None
    if shape != (dim,):
        return None
    want_dtype = (vals[0].state[2].typestr, vals[0].state[2].state)
    n_bytes, raws = len(raw0), []
    for v in vals:  # ... and every other row the same in form (same dtype description, same byte count)
        st = v.state if type(v) is PendingArray else None
        if (type(st) is not tuple or len(st) != 5 or st[1] != shape or st[3] or type(st[4]) is not bytes
                or len(st[4]) != n_bytes or (getattr(st[2], "typestr", None), getattr(st[2], "state", None)) != want_dtype):
            return None
        raws.append(st[4])
    try:
        ids = np.fromiter(obj.keys(), dtype=np.int64, count=len(obj))  # a key that is no int64 raises
    except (TypeError, ValueError, OverflowError):
        return None
    return ids, np.frombuffer(b"".join(raws), dtype=dt).reshape(len(vals), dim).astype(np.float32)


def _load_pickle_source(path: Path, dim: int, add: Callable[[np.ndarray, np.ndarray], None], skipped: dict) -> None:
    obj = load_pickle(path, lazy_arrays=True)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a dict {{creative_id: vector}}, got {type(obj).__name__}")
    fast = _pickle_fast(obj, dim)
    if fast is not None:
        add(*_drop_nonfinite(*fast, skipped))
        return
    obj = finish_pickle(obj, path)
    ids, rows = [], []
    for k, v in obj.items():
        try:
            vec = np.asarray(v, dtype=np.float32).reshape(-1)
            cid = int(k)
            if not fits_int64(cid):
                raise ValueError("id beyond int64")
        except (TypeError, ValueError, OverflowError):
            skipped["unparseable"] = skipped.get("unparseable", 0) + 1
            continue
        if vec.shape != (dim,):
            skipped["wrong_length"] = skipped.get("wrong_length", 0) + 1
            continue
        ids.append(cid)
        rows.append(vec)
    if rows:
        add(*_drop_nonfinite(np.asarray(ids, np.int64), np.stack(rows), skipped))


def _source_signature(files: list[Path]) -> list[list]:
    """What identifies a source file's contents without reading them. Besides size and mtime (which `cp -p`,
    `rsync -t` and `tar x` restore), the inode and ctime: a rewrite or a copy always changes one of them."""
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return out


def _die_with_parent() -> None:
    """Parse workers end when the loading process dies, even by kill -9 (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _cache_dir_for(emb_dir: Path, cache_dir: Path | None) -> Path | None:
    candidates = [cache_dir] if cache_dir else []
    candidates += [emb_dir / ".genrec_cache",
                   cache_root() / "mm_emb" / hashlib.sha1(str(emb_dir.resolve()).encode()).hexdigest()[:16]]
    for c in candidates:
        if c is not None and is_writable_dir(c):
            return c
    return None


def _try_cached(cdir: Path, stem: str, sig: list, dim: int, fid: str) -> MMEmbedding | None:
    meta_p = cdir / f"{stem}.meta.json"
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("sources") != sig or meta.get("dim") != dim:
            return None
        n = int(meta["n"])
        emb_p, ids_p = cdir / f"{stem}.f32", cdir / f"{stem}.ids.i64"
        if emb_p.stat().st_size != n * dim * 4 or ids_p.stat().st_size != n * 8:
            return None
        emb = np.memmap(emb_p, dtype=np.float32, mode="r", shape=(n, dim)) if n else np.zeros((0, dim), np.float32)
        ids = np.fromfile(ids_p, dtype=np.int64)
        return MMEmbedding(fid, ids, emb, dict(meta.get("skipped", {})))
    except (OSError, ValueError, KeyError):
        return None


def load_feature(emb_dir: str | os.PathLike, fid: str, cache_dir: str | os.PathLike | None = None,
                 use_cache: bool = True, dim: int | None = None) -> MMEmbedding | None:
    """Load one feature; None (with a warning) when `creative_emb/` or the feature is missing. `dim`: the width
    expected (picks among several sources of the feature)."""
    emb_dir = Path(emb_dir)
    fid = str(fid)
    src = find_feature_source(emb_dir, fid, dim)
    if src is None:
        if not emb_dir.is_dir():
            log.warning("no multimodal embeddings: folder %s not found", emb_dir)
        else:
            log.warning("multimodal feature %s not found in %s (expected emb_%s_<dim>/ or emb_%s_<dim>.pkl)",
                        fid, emb_dir, fid, fid)
        return None
    path, dim = src
    files = _part_files(path) if path.is_dir() else [path]
    if not files:
        log.warning("multimodal feature %s: %s holds no part files", fid, path)
        return None
    sig = _source_signature(files)
    stem = f"emb_{fid}_{dim}"
    cdir = _cache_dir_for(emb_dir, Path(cache_dir) if cache_dir else None) if use_cache else None
    if cdir is not None:
        cached = _try_cached(cdir, stem, sig, dim, fid)
        if cached is not None:
            log.info("mm_emb %s: %d x %d from cache %s", fid, len(cached), dim, cdir)
            return cached

    log.info("mm_emb %s: first load of %s (%d file(s), %.0f MiB): parsing%s", fid, path, len(files),
             sum(f.stat().st_size for f in files) / 2**20, f" into the cache {cdir}" if cdir else " (no cache)")
    try:
        return _parse_feature(path, files, sig, dim, fid, stem, cdir)
    except OSError as e:
        if cdir is None:
            raise
        # The cache is an optimisation: a full or failing disk under it must not cost the data.
        log.warning("mm_emb %s: cannot write the cache in %s (%s); loading without it", fid, cdir, e)
        return _parse_feature(path, files, sig, dim, fid, stem, None)


def _parse_feature(path: Path, files: list[Path], sig: list, dim: int, fid: str, stem: str,
                   cdir: Path | None) -> MMEmbedding:
    """Parse every source file of a feature, into the cache `cdir` (memory-mapped on return) or into memory."""
    skipped: dict = {}
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # only without a cache dir
    n = 0
    with ExitStack() as stack:
        # Rows stream into the cache files (temp files renamed on success), so memory stays a few chunks.
        emb_f = stack.enter_context(atomic_open(cdir / f"{stem}.f32", "wb")) if cdir else None
        ids_f = stack.enter_context(atomic_open(cdir / f"{stem}.ids.i64", "wb")) if cdir else None

        def add(ids: np.ndarray, emb: np.ndarray) -> None:
            nonlocal n
            n += len(ids)
            if emb_f is not None:
                emb_f.write(np.ascontiguousarray(emb, np.float32).tobytes())
                ids_f.write(np.ascontiguousarray(ids, np.int64).tobytes())
            elif len(ids):
                parts.append((ids, emb))

        total = sum(f.stat().st_size for f in files)
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading mm_emb {fid}",
                                       leave=False, disable=progress_disabled()))
        for f in files:
            if f.suffix == ".pkl":
                _load_pickle_source(f, dim, add, skipped)
                bar.update(f.stat().st_size)
        tasks = [(f, lo, hi, dim) for f, lo, hi in _ranges([f for f in files if f.suffix != ".pkl"])]
        for ids, emb, sk, nbytes in _parsed_ranges(tasks):
            add(ids, emb)
            for k, v in sk.items():
                skipped[k] = skipped.get(k, 0) + v
            bar.update(nbytes)
        if _source_signature(files) != sig:  # before the cache is committed: a changed source never lands in it
            raise DataFormatError(f"{path}: source files changed while loading; run again")
    if skipped:
        log.warning("mm_emb %s: skipped %d bad rows (%s)", fid, sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    if cdir is None:
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        emb = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, dim), np.float32)
        return MMEmbedding(fid, ids, emb, skipped)
    write_json(cdir / f"{stem}.meta.json", {"version": CACHE_VERSION, "fid": fid, "dim": dim, "n": n,
                                            "sources": sig, "skipped": skipped})
    cached = _try_cached(cdir, stem, sig, dim, fid)
    if cached is None:  # the cache files we just wrote were replaced under us (another writer)
        raise DataFormatError(f"{cdir}: cache of feature {fid} changed while writing it; run again")
    return cached


def load_mm_emb(emb_dir: str | os.PathLike, feat_ids: Iterable[str], cache_dir: str | os.PathLike | None = None,
                use_cache: bool = True, dims: Mapping[str, int] | None = None) -> dict[str, MMEmbedding]:
    """Load every listed feature that exists; missing ones are warned about and left out. `dims`: the width
    each feature is expected to have (a checkpoint's schema)."""
    out = {}
    dims = dims or {}
    for fid in tqdm([str(f) for f in feat_ids], desc="Loading mm_emb", leave=False, disable=progress_disabled()):
        feat = load_feature(emb_dir, fid, cache_dir, use_cache, dims.get(fid))
        if feat is not None:
            out[fid] = feat
    return out
