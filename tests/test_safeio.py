"""genrec/core/safeio.py: the restricted unpickler (nothing we read can execute code or crash the process)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dataset import DataFormatError, UnsafePickleError, load_pickle


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _crafted(tmp_path, data: bytes):
    p = tmp_path / "crafted.pkl"
    p.write_bytes(data)
    return p


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "indexer.pkl"
    p.write_bytes(pickle.dumps({"u": _Evil()}))
    with pytest.raises(UnsafePickleError, match="indexer.pkl"):
        load_pickle(p)


def test_restricted_unpickler_reads_plain_data_and_numpy(tmp_path):
    p = tmp_path / "x.pkl"
    obj = {"a": [1, 2.5, "s"], 7: np.arange(3, dtype=np.float32), "s": {1, 2}}
    p.write_bytes(pickle.dumps(obj))
    back = load_pickle(p)
    assert back["a"] == [1, 2.5, "s"] and back["s"] == {1, 2}
    np.testing.assert_array_equal(back[7], obj[7])


def test_truncated_pickle_is_a_clear_error(tmp_path):
    p = tmp_path / "seq_offsets.pkl"
    p.write_bytes(pickle.dumps(list(range(100)))[:10])
    with pytest.raises(DataFormatError, match="seq_offsets.pkl"):
        load_pickle(p)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_round_trips_numeric_numpy(tmp_path, protocol):
    obj = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "F": np.asfortranarray(np.ones((3, 2))),
           "be": np.arange(3, dtype=">i4"), "b": np.array([True, False]), "u": np.arange(4, dtype=np.uint8),
           "s": np.float32(2.5), "i": np.int64(-7), "e": np.zeros((0, 4), np.float32),
           "nested": [(1, np.arange(2, dtype=np.int16))], "od": __import__("collections").OrderedDict(a=1),
           b"raw": bytearray(b"xy")}
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = load_pickle(p)
    for k in ("f", "F", "be", "b", "u", "e"):
        np.testing.assert_array_equal(back[k], obj[k])
        assert back[k].dtype == obj[k].dtype and back[k].flags.writeable
    assert back["s"] == np.float32(2.5) and back["i"] == -7 and back["od"] == {"a": 1} and back[b"raw"] == b"xy"
    np.testing.assert_array_equal(back["nested"][0][1], [0, 1])


def test_crafted_numpy_pickles_are_refused_not_crashing(tmp_path):
    good = pickle.dumps(np.arange(4, dtype=np.float64), protocol=2)
    assert b"f8" in good
    for bad in (good.replace(b"f8", b"O8"),  # object array over raw bytes: pointers forged from the data
                good.replace(b"f8", b"V8")):  # a void dtype
        with pytest.raises(UnsafePickleError, match="plain number type"):
            load_pickle(_crafted(tmp_path, bad))
    big_shape = pickle.dumps(np.arange(4, dtype=np.float64), protocol=2).replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85")
    with pytest.raises((UnsafePickleError, DataFormatError)):
        load_pickle(_crafted(tmp_path, big_shape))  # shape 2**30, 32 bytes of data: refused, nothing allocated
    with pytest.raises(UnsafePickleError, match="refused"):
        load_pickle(_crafted(tmp_path, b"\x80\x04cbuiltins\nbytes\nJ\x00\x00\x00\x10\x85R."))  # bytes(2**28)
    with pytest.raises(UnsafePickleError, match="refused"):
        load_pickle(_crafted(tmp_path, b"\x80\x04cbuiltins\nbytearray\nJ\x00\x00\x00\x10\x85R."))


def test_atomic_write_failing_mid_write_keeps_the_old_file(tmp_path):
    from genrec.core.safeio import atomic_open, write_json

    p = tmp_path / "semantic_id_report.json"
    write_json(p, {"old": True})
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_open(p, "w") as f:
            f.write('{"new": ')  # bytes already written when the failure comes
            f.flush()
            raise RuntimeError("disk on fire")
    with pytest.raises(TypeError):
        write_json(p, {"a": 1, "b": object()})  # json.dump fails half way through the object
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temp file left behind


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """kill -9 mid-write leaves `.name.XXXX.tmp`: the next atomic write of the same file removes it once it is
    older than any live writer's (a writer active in the last minutes may still be alive)."""
    import os
    import time

    from genrec.core.safeio import STALE_TMP_SECONDS, write_json

    target = tmp_path / "semantic_id_dict.json"
    dead, live = tmp_path / ".semantic_id_dict.json.abc123.tmp", tmp_path / ".semantic_id_dict.json.def456.tmp"
    other = tmp_path / ".semantic_id_report.json.abc123.tmp"
    for p in (dead, live, other):
        p.write_text("{")
    old = time.time() - STALE_TMP_SECONDS - 60
    for p in (dead, other):
        os.utime(p, (old, old))
    write_json(target, {"1": [1, 2, 3, 4]})
    assert not dead.exists() and live.exists() and other.exists()
