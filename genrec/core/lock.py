"""An exclusive lock file between processes that never waits for ever.

The holder's pid is written into the lock file, so a waiter can say who it waits for; a dead holder's lock is free
(flock dies with its process); a live one that never lets go (stopped, hung) is given up on after
$GENREC_LOCK_TIMEOUT seconds (default LOCK_TIMEOUT) with a LockTimeout. The lock file is never followed through a
symlink, never opened when it is not a regular file, and removed when its holder lets go.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 3600.0  # seconds: longer than any generation of IDs we know of, short of for ever
POLL = 0.2


class LockError(OSError):
    """The lock file cannot be used (a symlink, not a regular file, no permission)."""


class LockTimeout(LockError, TimeoutError):
    """The lock stayed held by another live process past the timeout."""


def lock_timeout() -> float:
    """$GENREC_LOCK_TIMEOUT (seconds, > 0), else LOCK_TIMEOUT; a wrong value is a one-line error."""
    raw = os.environ.get("GENREC_LOCK_TIMEOUT", "").strip()
    if not raw:
        return LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise LockError(f"GENREC_LOCK_TIMEOUT={raw!r}: want a number of seconds > 0")
    return value


def _open(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise LockError(f"{path}: the lock file is a symlink; refusing to follow it (remove it)") from None
        if e.errno == errno.ENXIO:  # a FIFO without a reader
            raise LockError(f"{path}: the lock file is not a regular file (remove it)") from None
        raise LockError(f"{path}: cannot open the lock file ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"{path}: the lock file is not a regular file (remove it)")
    return fd


def holder(path: Path) -> str:
    """The pid written by the lock's holder, or '?'."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "?"
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text if text.isdigit() else "?"


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "", timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block. Waits for another holder (logging its pid), at most `timeout`
    seconds (default: lock_timeout()), then raises LockTimeout naming the holder."""
    path = Path(path)
    timeout = lock_timeout() if timeout is None else timeout
    start = time.monotonic()
    next_note = start
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            now = time.monotonic()
            who = holder(path)
            if now - start >= timeout:
                raise LockTimeout(f"{path}: still held by pid {who} after {timeout:.0f} s (GENREC_LOCK_TIMEOUT); "
                                  f"gave up {what or 'waiting'}") from None
            if now >= next_note:
                log.info("waiting for pid %s, which holds %s%s", who, path, f" ({what})" if what else "")
                next_note = now + 30
            time.sleep(POLL)
            continue
        # Ours, unless the holder we waited for removed this file on release: then lock the new one.
        try:
            on_disk = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            on_disk = None
        mine = os.fstat(fd)
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            try:
                os.unlink(path)  # still ours: nobody else can hold it now
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
