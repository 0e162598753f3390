"""genrec/core/lock.py: the lock between processes never waits for ever, says who holds it, and never follows a
symlink or opens what is not a regular file."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from genrec.core.lock import LockError, LockTimeout, file_lock, lock_timeout

ROOT = Path(__file__).resolve().parents[1]


def _hold(path: Path, release: threading.Event, held: threading.Event) -> threading.Thread:
    def run():
        with file_lock(path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert held.wait(5)
    return t


def test_a_waiter_names_the_holder_and_gives_up_after_the_timeout(tmp_path, caplog):
    path = tmp_path / "x.lock"
    release, held = threading.Event(), threading.Event()
    t = _hold(path, release, held)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="genrec.core.lock"):
        with pytest.raises(LockTimeout, match=f"held by pid {os.getpid()} after 1 s"):
            with file_lock(path, timeout=1.0):
                pass
    assert 0.9 < time.monotonic() - t0 < 5
    assert any(f"waiting for pid {os.getpid()}" in r.getMessage() for r in caplog.records)
    release.set()
    t.join()


def test_a_waiter_gets_the_lock_when_the_holder_lets_go_and_no_file_stays(tmp_path):
    path = tmp_path / "x.lock"
    release, held = threading.Event(), threading.Event()
    t = _hold(path, release, held)
    threading.Timer(0.5, release.set).start()
    with file_lock(path, timeout=10):
        assert path.read_text().strip() == str(os.getpid())
    t.join()
    assert not path.exists()


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    path = tmp_path / "x.lock"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\nfrom genrec.core.lock import file_lock\n"
            f"with file_lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        p.kill()
        p.wait()
        t0 = time.monotonic()
        with file_lock(path, timeout=5):
            pass
        assert time.monotonic() - t0 < 2
    finally:
        p.kill()


def test_a_symlinked_lock_is_refused_and_its_target_never_made(tmp_path):
    path, target = tmp_path / "x.lock", tmp_path / "elsewhere"
    path.symlink_to(target)
    with pytest.raises(LockError, match="symlink"):
        with file_lock(path, timeout=1):
            pass
    assert not target.exists()


def test_a_fifo_at_the_lock_path_is_refused_without_blocking(tmp_path):
    path = tmp_path / "x.lock"
    os.mkfifo(path)
    t0 = time.monotonic()
    with pytest.raises(LockError, match="not a regular file"):
        with file_lock(path, timeout=1):
            pass
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_wrong_lock_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("GENREC_LOCK_TIMEOUT", value)
    with pytest.raises(LockError, match="GENREC_LOCK_TIMEOUT"):
        lock_timeout()
