"""Safe reading and atomic writing: nothing we read can execute code, nothing we write is ever half a file."""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# The only globals a data pickle may reference: plain containers and numpy arrays/scalars.
_ALLOWED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataFormatError(ValueError):
    """Input that does not follow the competition data format; the message names the file (and line)."""


class UnsafePickleError(DataFormatError):
    """A pickle that references something other than plain data."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle plain data (containers, numbers, strings, numpy arrays); refuse anything that could run code."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused to unpickle: {e}") from e
    except Exception as e:  # truncated or garbage pickles raise many kinds of errors
        raise DataFormatError(f"{path}: not a readable pickle: {e!r}") from e


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Write to a temp file in the same folder, fsync, then rename over `path`; on error the old file stays."""
    path = Path(path)
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
