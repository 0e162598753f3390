"""Safe reading and atomic writing: nothing we read can execute code, nothing we write is ever half a file."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tempfile
import time
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import numpy as np

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # ids we accept: what an int64 array can hold


def fits_int64(v: int) -> bool:
    return INT64_MIN <= v <= INT64_MAX


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataFormatError(ValueError):
    """Input that does not follow the competition data format; the message names the file (and line)."""


class UnsafePickleError(DataFormatError):
    """A pickle that references something other than plain data."""


# Numpy objects come out of a pickle only through these stand-ins, checked, then rebuilt from scratch: a crafted
# pickle can describe an object-dtype array over raw bytes (a segfault on access), a dtype with forged flags, or
# an empty array of a huge shape (memory). Only plain numeric arrays come out, their bytes all from the file.
_NUMERIC = re.compile(r"^[biuf](1|2|4|8)$")
_MAX_DEPTH = 200


class _Marker:
    """numpy.ndarray as a pickle names it (only ever the first argument of _reconstruct)."""


_DTYPES: dict[tuple, np.dtype] = {}  # (typestr, state) -> checked dtype: numpy pickles one dtype per array


class _PendingDtype:
    __slots__ = ("typestr", "state", "built")

    def __init__(self, typestr: Any = None, align: Any = None, copy: Any = None) -> None:
        self.typestr, self.state, self.built = typestr, None, None

    def __setstate__(self, state: Any) -> None:
        self.state, self.built = state, None

    def build(self) -> np.dtype:
        if self.built is not None:
            return self.built
        try:
            key = (self.typestr, self.state)
            hit = _DTYPES.get(key)
        except TypeError:  # an unhashable state: checked below, the slow way
            key, hit = None, None
        if hit is not None:
            self.built = hit
            return hit
        self.built = self._check()
        if key is not None and len(_DTYPES) < 256:
            _DTYPES[key] = self.built
        return self.built

    def _check(self) -> np.dtype:
        if not isinstance(self.typestr, str) or not _NUMERIC.match(self.typestr):
            raise pickle.UnpicklingError(f"numpy dtype {self.typestr!r} is not a plain number type")
        st = self.state
        order = "|"
        if st is not None:
            if not (isinstance(st, tuple) and len(st) >= 5 and all(x is None for x in st[2:5])):
                raise pickle.UnpicklingError("numpy dtype with fields or sub-arrays")
            order = st[1] if st[1] in ("<", ">", "|", "=") else "|"
        dt = np.dtype(self.typestr)
        return dt.newbyteorder(order) if order in ("<", ">") else dt


class PendingArray:
    """Stands where numpy would build an array: `build()` checks the state and makes the array. A reader that
    wants one matrix from many rows (`load_pickle(..., lazy_arrays=True)`) can join the `raw` bytes instead."""
    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def _state(self) -> tuple:
        st = self.state
        if not (type(st) is tuple and len(st) == 5):
            raise pickle.UnpicklingError("numpy array without its state")
        return st

    def parts(self) -> tuple[tuple, np.dtype, Any]:
        """(shape, checked dtype, raw bytes), the byte count checked against shape and dtype."""
        _, shape, dtype, fortran, raw = self._state()
        if fortran or type(raw) is not bytes:
            raise pickle.UnpicklingError(f"numpy array state (shape {shape!r})")
        dt, buf = _checked(raw, dtype, shape)
        return shape, dt, buf

    def build(self) -> np.ndarray:
        _, shape, dtype, fortran, raw = self._state()
        return _array(raw, dtype, shape, "F" if fortran else "C")


def _dtype(d: Any) -> np.dtype:
    if type(d) is _PendingDtype:
        return d.build()
    raise pickle.UnpicklingError(f"not a numpy dtype: {type(d).__name__}")


def _checked(raw: Any, dtype: Any, shape: Any) -> tuple[np.dtype, Any]:
    """(dtype, buffer) of an array's pickled parts: a plain numeric dtype, a shape of non-negative ints, raw
    bytes (never objects) and exactly as many of them as the shape needs: all the data comes from the file."""
    dt = _dtype(dtype)
    if type(shape) is not tuple or not (len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0
                                        or all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"numpy array shape {shape!r}")
    if type(raw) is not bytes:
        try:
            raw = memoryview(raw).cast("B")
        except TypeError:
            raise pickle.UnpicklingError("numpy array data is not raw bytes (object arrays are refused)") from None
    if len(raw) != (shape[0] if len(shape) == 1 else math.prod(shape)) * dt.itemsize:
        raise pickle.UnpicklingError(f"numpy array of shape {shape} {dt} with {len(raw)} bytes of data")
    return dt, raw


def _array(raw: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    dt, buf = _checked(raw, dtype, shape)
    a = np.frombuffer(buf, dtype=dt)
    if len(shape) != 1 or order == "F":
        a = a.reshape(shape, order="F" if order == "F" else "C")
    return a.copy()  # writable, owning its memory, like numpy's own unpickling


def _reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> PendingArray:
    if cls is not _Marker:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return PendingArray()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    return _array(buf, dtype, shape, order)


def _scalar(dtype: Any, data: Any = b"") -> Any:
    return _array(data if isinstance(data, (bytes, bytearray)) else b"?", dtype, ())[()]


def _no_size(kind: type) -> Any:
    """bytes / bytearray from data only: `bytes(2**28)` in a 46-byte pickle would allocate 256 MiB."""
    def make(arg: Any = b"", *rest: Any) -> Any:
        if isinstance(arg, int):
            raise pickle.UnpicklingError(f"{kind.__name__}(<size>) is refused")
        return kind(arg, *rest)
    return make


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:  # protocol 2 writes bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with other arguments")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", n): getattr(__import__("builtins"), n)
       for n in ("set", "frozenset", "dict", "list", "tuple", "int", "float", "str", "complex")},
    ("builtins", "bytes"): _no_size(bytes), ("builtins", "bytearray"): _no_size(bytearray),
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _Marker, ("numpy", "dtype"): _PendingDtype,
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol <= 2 names them the Python 2 way
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


_LEAF = (int, float, str, bytes, bool, type(None), complex, bytearray)


def _finish(obj: Any, depth: int = 0, memo: dict | None = None) -> Any:
    """Replace the numpy stand-ins by their checked arrays and dtypes, anywhere in plain containers."""
    memo = {} if memo is None else memo
    if depth > _MAX_DEPTH:
        raise pickle.UnpicklingError(f"data nested deeper than {_MAX_DEPTH} levels")
    t = type(obj)
    if t in _LEAF:
        return obj
    if t is PendingArray or t is _PendingDtype:
        return obj.build()
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, type):
        raise pickle.UnpicklingError("a bare class in the data")
    if isinstance(obj, dict):
        memo[id(obj)] = obj
        items = [(k if type(k) in _LEAF else _finish(k, depth + 1, memo),
                  v.build() if type(v) is PendingArray else v if type(v) in _LEAF else _finish(v, depth + 1, memo))
                 for k, v in obj.items()]
        obj.clear()
        obj.update(items)
        return obj
    if isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [v if type(v) in _LEAF else _finish(v, depth + 1, memo) for v in obj]
        return obj
    if isinstance(obj, (tuple, set, frozenset)):
        out = (tuple if isinstance(obj, tuple) else type(obj))(_finish(v, depth + 1, memo) for v in obj)
        memo[id(obj)] = out
        return out
    return obj


def load_pickle(path: str | os.PathLike, lazy_arrays: bool = False) -> Any:
    """Unpickle plain data (containers, numbers, strings, plain numeric numpy arrays); refuse anything that could
    run code, crash the process or allocate more than the file holds. `lazy_arrays`: numpy arrays stay
    PendingArray (checked when built) for a reader that joins many rows into one matrix; pass what it does not
    take to `finish_pickle`."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
        return obj if lazy_arrays else _finish(obj)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused to unpickle: {e}") from e
    except Exception as e:  # truncated or garbage pickles raise many kinds of errors
        raise DataFormatError(f"{path}: not a readable pickle: {e!r}") from e


STALE_TMP_SECONDS = 600  # a temp file nobody wrote to for this long belongs to a writer that died (kill -9)


def clean_stale_temps(path: Path) -> int:
    """Remove the temp files of earlier writers of `path` that died mid-write; returns how many."""
    n = 0
    for t in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        try:
            if time.time() - t.stat().st_mtime > STALE_TMP_SECONDS:
                t.unlink()
                n += 1
        except OSError:
            pass
    return n


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Write to a temp file in the same folder, fsync, then rename over `path`; on error the old file stays.
    Temp files that killed writers of `path` left behind are removed first."""
    path = Path(path)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> None:
    """Atomically write `obj` as JSON (compact separators for big files, indented for reports)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, separators=(",", ":"))
        else:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")


def is_writable_dir(path: str | os.PathLike) -> bool:
    """True when we can create files in `path` (checked by trying, since os.access lies under some mounts)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".writetest.", dir=path)
        os.close(fd)
        os.unlink(tmp)
        return True
    except OSError:
        return False


def cache_root() -> Path:
    """Where we keep caches and the demo world: $GENREC_CACHE_DIR, else ~/.cache/genrec."""
    env = os.environ.get("GENREC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "genrec"


def finish_pickle(obj: Any, path: str | os.PathLike) -> Any:
    """`load_pickle(..., lazy_arrays=True)`'s result with every array built and checked."""
    try:
        return _finish(obj)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused to unpickle: {e}") from e
