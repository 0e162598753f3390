"""dataset/mm_emb.py: creative_emb/ part files, their parse, their binary cache."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from dataset import DataFormatError, load_feature, load_mm_emb


def _emb_folder(root, fid, dim, lines, name="part-00000"):
    d = root / "creative_emb" / f"emb_{fid}_{dim}"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join(ln + "\n" for ln in lines))
    return d


def _varied_rows(n: int, dim: int, seed: int = 0, id_max: int = 2**63 - 1) -> tuple[list[str], np.ndarray]:
    """Lines as real exports write them: shortest round-trip floats over many magnitudes, big and negative ids."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, dim)) * 10.0 ** rng.integers(-12, 6, size=(n, dim))).astype(np.float32)
    ids = rng.integers(-id_max, id_max, size=n, dtype=np.int64)
    lines = [json.dumps({"anonymous_cid": int(c), "emb": [float(v) for v in r]}) for c, r in zip(ids, x)]
    return lines, np.array([json.loads(ln)["emb"] for ln in lines], np.float32)


def test_bad_embedding_rows_are_skipped_and_counted(tmp_path, caplog):
    good = [json.dumps({"anonymous_cid": i, "emb": [float(i)] * 4}) for i in range(1, 6)]
    bad = ['{"anonymous_cid": 7, "emb": [1, 2, 3]}',  # wrong length
           '{"anonymous_cid": 8, "emb": [1, NaN, 3, 4]}',  # NaN (Python's json writes this)
           '{"anonymous_cid": 9, "emb": [1, Infinity, 3, 4]}',
           '{"anonymous_cid": 10, "emb": [1, 2, 3',  # truncated JSON
           'not json at all']
    _emb_folder(tmp_path, 82, 4, good[:3] + bad + good[3:])
    with caplog.at_level("WARNING"):
        f = load_feature(tmp_path / "creative_emb", "82")
    assert sorted(f.ids.tolist()) == [1, 2, 3, 4, 5]
    assert f.skipped == {"wrong_length": 1, "non_finite": 2, "unparseable": 2}
    assert "skipped 5 bad rows" in caplog.text
    np.testing.assert_array_equal(f.emb[f.rows([4])[0]], [4.0] * 4)


def test_missing_creative_emb_is_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert load_mm_emb(tmp_path / "creative_emb", ["81", "82"]) == {}
    assert "not found" in caplog.text


def test_pickle_and_json_part_variants_and_any_dim(tmp_path):
    emb = tmp_path / "creative_emb"
    emb.mkdir()
    (emb / "emb_81_32.pkl").write_bytes(pickle.dumps({11: np.ones(32, np.float32), 12: np.zeros(31, np.float32)}))
    _emb_folder(tmp_path, 86, 3, [json.dumps({"anonymous_cid": 5, "emb": [1, 2, 3]})], name="a.json")
    _emb_folder(tmp_path, 99, 2, [json.dumps({"emb": [1, 2], "anonymous_cid": 6})], name="part-00003")  # other key order
    feats = load_mm_emb(emb, ["81", "86", "99"])
    assert feats["81"].ids.tolist() == [11] and feats["81"].skipped == {"wrong_length": 1}
    assert feats["86"].dim == 3 and feats["86"].ids.tolist() == [5]
    assert feats["99"].dim == 2 and feats["99"].emb.tolist() == [[1.0, 2.0]]


def test_cache_is_memory_mapped_and_invalidated_on_change(tmp_path):
    d = _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, -i]}) for i in range(50)])
    first = load_feature(tmp_path / "creative_emb", "82")
    again = load_feature(tmp_path / "creative_emb", "82")
    assert isinstance(again.emb, np.memmap)
    np.testing.assert_array_equal(first.emb, again.emb)
    time.sleep(0.01)
    with open(d / "part-00000", "a") as f:
        f.write(json.dumps({"anonymous_cid": 99, "emb": [1, 2]}) + "\n")
    changed = load_feature(tmp_path / "creative_emb", "82")
    assert len(changed) == 51 and 99 in changed.ids


def test_cache_goes_elsewhere_when_data_dir_is_read_only(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, i]}) for i in range(5)])
    real = mm.is_writable_dir
    monkeypatch.setattr(mm, "is_writable_dir", lambda p: "creative_emb" not in str(p) and real(p))
    load_feature(tmp_path / "creative_emb", "82")
    assert not (tmp_path / "creative_emb" / ".genrec_cache").exists()
    assert isinstance(load_feature(tmp_path / "creative_emb", "82").emb, np.memmap)


@pytest.mark.parametrize("pandas_on", [True, False])
def test_first_load_matches_json_loads_with_and_without_pandas(tmp_path, monkeypatch, pandas_on):
    import dataset.mm_emb as mm

    if pandas_on:
        pytest.importorskip("pandas")
    monkeypatch.setenv("GENREC_NO_PANDAS", "" if pandas_on else "1")
    mm._pandas.cache_clear()
    assert (mm._pandas() is None) is not pandas_on  # GENREC_NO_PANDAS=1 switches the native parser off
    lines, ref = _varied_rows(3000, 7)
    bad = ['{"anonymous_cid": 99999999999999999999999, "emb": [1, 2, 3, 4, 5, 6, 7]}',  # id beyond int64
           '[' * 100_000 + ']' * 100_000,  # nested deeper than Python's recursion limit
           '{"anonymous_cid": 8, "emb": [1, 2, 3, 4, 5, 6, 7, 8]}']  # wrong length
    _emb_folder(tmp_path, 82, 7, lines[:1500] + bad + lines[1500:])
    monkeypatch.setattr(mm, "_CHUNK_BYTES", 64 << 10)  # many chunks: most clean, one holding the bad lines
    f = load_feature(tmp_path / "creative_emb", "82", use_cache=False)
    mm._pandas.cache_clear()
    assert f.skipped == {"unparseable": 2, "wrong_length": 1}
    np.testing.assert_array_equal(f.ids, [json.loads(ln)["anonymous_cid"] for ln in lines])
    np.testing.assert_array_equal(f.emb, ref)  # bit for bit what json.loads -> float32 gives


def test_native_parser_takes_clean_chunks_and_refuses_other_layouts(monkeypatch):
    import dataset.mm_emb as mm

    pytest.importorskip("pandas")
    monkeypatch.delenv("GENREC_NO_PANDAS", raising=False)
    mm._pandas.cache_clear()
    lines, ref = _varied_rows(50, 4, id_max=2**53 - 1)
    for sep, end in (("\n", "\n"), ("\r\n", ""), ("\r\n", "\r\n")):  # LF, CRLF, with or without the last one
        ids, emb = mm._native_parse((sep.join(lines) + end).encode(), 4)
        np.testing.assert_array_equal(emb, ref)
        assert ids.tolist() == [json.loads(ln)["anonymous_cid"] for ln in lines]
    for bad in ['{"anonymous_cid": 5, "emb": [1, 2, 3, NaN]}', '{"emb": [1, 2, 3, 4], "anonymous_cid": 5}',
                '{"anonymous_cid": 5, "emb": [1, 2, 3]}', '{"anonymous_cid": 5, "emb": [1, 2, 3, 4, 5]}',
                '{"anonymous_cid": 1.5, "emb": [1, 2, 3, 4]}', '{"anonymous_cid": "5", "emb": [1, 2, 3, 4]}',
                '{"anonymous_cid": 5, "emb": [1, 2, 3, 4], "x": 1}', '{"anonymous_cid": 5, "emb": [1, 2, null, 4]}',
                '{"anonymous_cid": 18446744073709551616, "emb": [1, 2, 3, 4]}',
                '{"anonymous_cid": 9007199254740993, "emb": [1, 2, 3, 4]}',  # int64, but not exact in float64
                '{"anonymous_cid": [5], "emb": [1, 2, 3, 4]}',
                '{"anonymous_cid": 5, "emb": [1, 2, "3", 4]}', '{"anonymous_cid": 5, "emb": [1, 2, [3], 4]}', '',
                '{"anonymous_cid": 5, "emc": [1, 2, 3, 4]}', '{"anonymous_cix": 5, "emb": [1, 2, 3, 4]}',
                '{"anonymous_cid": 5, "xemb": [1, 2, 3, 4]}', '{"anonymous_cid": 5, "embx": [1, 2, 3, 4]}',
                '{"anonymous_cid": 5, "emb": [1, 2, 3, 4]} {"anonymous_cid": 6, "emb": [1, 2, 3, 4]}']:
        block = "\n".join(lines[:2] + [bad] + lines[2:4]).encode()
        assert mm._native_parse(block, 4) is None, bad  # the line-by-line parser then skips and counts it


def test_pickle_layout_common_and_mixed_entries(tmp_path):
    emb = tmp_path / "creative_emb"
    emb.mkdir()
    rows = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    clean = {i + 1: r for i, r in enumerate(rows)}
    (emb / "emb_81_4.pkl").write_bytes(pickle.dumps(clean))
    f = load_feature(emb, "81", use_cache=False)
    assert f.ids.tolist() == list(range(1, 21)) and f.skipped == {}
    np.testing.assert_array_equal(f.emb, rows)
    mixed = {**clean, 21: [1.0, 2.0, 3.0, 4.0], "22": np.ones(4), 23: np.ones(3, np.float32), 2**70: rows[0],
             24: np.array([1, np.nan, 0, 0], np.float32)}
    (emb / "emb_81_4.pkl").write_bytes(pickle.dumps(mixed))
    f = load_feature(emb, "81", use_cache=False)
    assert f.ids.tolist() == [*range(1, 23)]
    assert f.skipped == {"wrong_length": 1, "unparseable": 1, "non_finite": 1}


def test_cache_is_not_served_after_a_same_size_rewrite_with_mtime_restored(tmp_path):
    d = _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, -i]}) for i in range(20)])
    part = d / "part-00000"
    first = load_feature(tmp_path / "creative_emb", "82")
    assert isinstance(load_feature(tmp_path / "creative_emb", "82").emb, np.memmap)  # a cache hit ...
    st = part.stat()
    part.write_text(part.read_text().replace('"emb": [3, -3]', '"emb": [7, -7]'))  # same size
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t / tar x leave it
    assert part.stat().st_size == st.st_size and part.stat().st_mtime_ns == st.st_mtime_ns
    again = load_feature(tmp_path / "creative_emb", "82")
    assert again.emb[again.rows([3])[0]].tolist() == [7.0, -7.0]  # ... but not of stale values
    np.testing.assert_array_equal(first.emb[first.rows([4])[0]], again.emb[again.rows([4])[0]])


def test_cache_hit_gives_the_source_values(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    lines, ref = _varied_rows(200, 3)
    _emb_folder(tmp_path, 82, 3, lines)
    load_feature(tmp_path / "creative_emb", "82")
    parsed = []
    monkeypatch.setattr(mm, "_parse_range", lambda t: parsed.append(t))  # a second parse would show here
    hit = load_feature(tmp_path / "creative_emb", "82")
    assert parsed == [] and isinstance(hit.emb, np.memmap)
    np.testing.assert_array_equal(hit.emb, ref)


def test_a_source_changing_while_loading_never_lands_in_the_cache(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    d = _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, i]}) for i in range(20)])
    real = mm._parse_range

    def parse_then_touch(task):
        out = real(task)
        with open(d / "part-00000", "a") as f:
            f.write(json.dumps({"anonymous_cid": 99, "emb": [1, 2]}) + "\n")
        return out

    monkeypatch.setattr(mm, "_parse_range", parse_then_touch)
    with pytest.raises(DataFormatError, match="changed while loading"):
        load_feature(tmp_path / "creative_emb", "82")
    assert not list((tmp_path / "creative_emb" / ".genrec_cache").glob("*.meta.json"))


def test_a_full_disk_under_the_cache_costs_only_the_cache(tmp_path, monkeypatch, caplog):
    import contextlib
    import errno

    import dataset.mm_emb as mm

    _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, i]}) for i in range(20)])

    class Full:
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mm, "atomic_open", lambda *a, **k: contextlib.nullcontext(Full()))
    with caplog.at_level("WARNING"):
        f = load_feature(tmp_path / "creative_emb", "82")
    assert sorted(f.ids.tolist()) == list(range(20)) and "cannot write the cache" in caplog.text
    assert ".genrec_cache" in caplog.text


def test_temp_files_of_dead_writers_are_removed(tmp_path):
    _emb_folder(tmp_path, 82, 2, [json.dumps({"anonymous_cid": i, "emb": [i, i]}) for i in range(5)])
    cache = tmp_path / "creative_emb" / ".genrec_cache"
    cache.mkdir()
    old, fresh = cache / ".emb_82_2.f32.dead1.tmp", cache / ".emb_82_2.f32.live2.tmp"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    load_feature(tmp_path / "creative_emb", "82")
    assert not old.exists() and fresh.exists()  # a writer active in the last minutes may still be alive


def test_two_sources_of_one_feature_pick_the_expected_width_or_fail_clearly(tmp_path):
    emb = tmp_path / "creative_emb"
    emb.mkdir()
    (emb / "emb_81_16.pkl").write_bytes(pickle.dumps({1: np.ones(16, np.float32)}))
    _emb_folder(tmp_path, 81, 32, [json.dumps({"anonymous_cid": 1, "emb": [0.5] * 32})])
    assert load_mm_emb(emb, ["81"], dims={"81": 32})["81"].dim == 32
    assert load_mm_emb(emb, ["81"], dims={"81": 16})["81"].dim == 16
    with pytest.raises(DataFormatError, match=r"feature 81 has 2 sources \(emb_81_16.pkl: 16-d, emb_81_32: 32-d\)"):
        load_mm_emb(emb, ["81"])


def test_a_huge_line_is_skipped_without_reading_it_into_memory(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    good = [json.dumps({"anonymous_cid": i, "emb": [i, -i]}) for i in range(1, 200)]
    huge = '{"anonymous_cid": 999, "emb": [' + "1.0, " * 600_000 + '1.0]}'  # 3 MB, over the 1 MiB bound
    _emb_folder(tmp_path, 82, 2, good[:100] + [huge] + good[100:] + [huge])
    monkeypatch.setattr(mm, "_CHUNK_BYTES", 1 << 16)  # the huge lines span many chunks
    f = load_feature(tmp_path / "creative_emb", "82", use_cache=False)
    assert sorted(f.ids.tolist()) == list(range(1, 200)) and f.skipped == {"too_long": 2}


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the parse pool needs 2 cores")
def test_parse_workers_die_with_a_killed_parent(tmp_path):
    import signal

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"""
import os, sys, time
sys.path.insert(0, {root!r})
import dataset.mm_emb as mm
def stuck(task):
    open(os.path.join({str(tmp_path)!r}, f"w{{os.getpid()}}"), "w").close()
    time.sleep(60)
mm._parse_range = stuck
list(mm._parsed_ranges([("x", 0, 1, 2)] * 4))
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    t0 = time.time()
    while len(list(tmp_path.glob("w*"))) < 2:
        assert time.time() - t0 < 60 and proc.poll() is None, "workers never started"
        time.sleep(0.05)
    pids = [int(p.name[1:]) for p in tmp_path.glob("w*")]
    proc.send_signal(signal.SIGKILL)  # kill -9 the loading process
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie waiting for its reaper counts as gone
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < 10:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "parse workers outlived their parent"


def test_the_pickle_layout_joins_rows_without_building_an_array_each(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    emb = tmp_path / "creative_emb"
    emb.mkdir()
    rows = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    (emb / "emb_81_4.pkl").write_bytes(pickle.dumps({i + 7: r for i, r in enumerate(rows)}))
    monkeypatch.setattr(mm, "finish_pickle", lambda *a: pytest.fail("took the entry-by-entry path"))
    f = load_feature(emb, "81", use_cache=False)
    np.testing.assert_array_equal(f.emb, rows)
    assert f.ids.tolist() == list(range(7, 57))
