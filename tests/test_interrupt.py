"""Ctrl-C and SIGTERM stop a CLI within a second or two at its longest stage (the first parse of creative_emb/,
done by a pool of workers), exit 130 / 143, write no result, leave no lock or temp file, and the rerun works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLOW_PARSE = """
import sys, time
sys.path.insert(0, {root!r})
import dataset.mm_emb as m
real = m._parse_range
def slow(task):
    time.sleep(60)
    return real(task)
m._parse_range = slow
from evalu.infer import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_the_first_parse_stops_at_once(world, checkpoint, tmp_path, sig, code):
    _, ev = world
    res = tmp_path / "res"
    args = ["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(res)]
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PARSE.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        for line in p.stderr:
            if "first load of" in line:
                break
        time.sleep(0.5)  # the workers are parsing
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # as a terminal does: the whole process group
        else:
            os.kill(p.pid, sig)  # as a scheduler does: the main process
        rest = p.communicate(timeout=20)[1]
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, rest[-2000:]
    assert took < 3, took
    assert not (res / "result.json").exists()
    leftovers = [q for q in ev.rglob("*") if q.name.endswith((".tmp", ".lock"))]
    assert not leftovers, leftovers
    if sig == signal.SIGINT:  # the rerun works (once is enough: both stops leave the same state, checked above)
        r = subprocess.run([sys.executable, "-m", "evalu.infer", *args], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
        assert r.returncode == 0 and (res / "result.json").is_file(), r.stderr[-2000:]


def test_parse_workers_that_cannot_start_fall_back_to_this_process(tmp_path, monkeypatch, caplog):
    """A memory cap or ulimit that forbids new processes or threads: parsed here instead, never a hang."""
    import concurrent.futures

    import numpy as np

    from dataset import mm_emb

    folder = tmp_path / "creative_emb" / "emb_82_4"
    folder.mkdir(parents=True)
    for k in range(2):
        (folder / f"part-0000{k}").write_text("".join(f'{{"anonymous_cid": {10 * k + i}, "emb": [{i}, 1, 2, 3]}}\n'
                                                      for i in range(10)))

    class NoPool:
        def __init__(self, *a, **k):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", NoPool)
    monkeypatch.setattr(mm_emb.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level("WARNING"):
        feat = mm_emb.load_feature(tmp_path / "creative_emb", "82")
    assert sorted(feat.ids.tolist()) == [*range(10), *range(10, 20)]
    assert np.asarray(feat.emb).shape == (20, 4)
    assert any("cannot start" in r.getMessage() for r in caplog.records)
