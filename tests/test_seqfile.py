"""dataset/seqfile.py: JSON-lines sequence files and their offsets."""
from __future__ import annotations

import json
import pickle

import pytest
from torch.utils.data import DataLoader

from dataset import DataFormatError, SeqFile, TrainDataset


def _write_seq(path, lines):
    with open(path, "w") as f:
        for ln in lines:
            f.write(ln + "\n")


def test_missing_offsets_are_rebuilt_with_a_warning(tmp_path, caplog):
    recs = [[[1, 5, None, {"100": 1}, 1, 10], [1, None, {"103": 1}, None, None, 11]],
            [[2, 6, None, {"100": 2}, 0, 12]]]
    _write_seq(tmp_path / "seq.jsonl", [json.dumps(r) for r in recs])
    with caplog.at_level("WARNING"):
        s = SeqFile(tmp_path / "seq.jsonl")
    assert "rebuilding offsets" in caplog.text
    assert len(s) == 2 and s[1] == recs[1]


def test_malformed_line_names_file_and_line(tmp_path):
    _write_seq(tmp_path / "seq.jsonl", ['[[1, 5, null, {}, 1, 10]]', '[[1, 5, null, {}, 1,'])
    s = SeqFile(tmp_path / "seq.jsonl")
    with pytest.raises(DataFormatError, match=r"seq.jsonl: line 2"):
        s[1]


@pytest.mark.parametrize("change", ["append", "zeros", "shifted", "garbage"])
def test_stale_offsets_are_rebuilt_with_a_warning(tmp_path, caplog, change):
    from dataset.seqfile import SeqFile

    lines = [json.dumps([[f"u{i}", i, None, {}, 1, i]]) for i in range(30)]
    p = tmp_path / "predict_seq.jsonl"
    p.write_text("\n".join(lines[:20]) + "\n")
    offs = SeqFile(p).offsets.tolist()
    if change == "append":  # 10 users added, the old offsets kept
        p.write_text("\n".join(lines) + "\n")
    elif change == "zeros":
        offs = [0] * len(offs)
    elif change == "shifted":
        offs = [o + 1 for o in offs]
    (tmp_path / "predict_seq_offsets.pkl").write_bytes(pickle.dumps(offs if change != "garbage" else "nonsense"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        seq = SeqFile(p)
    assert "rebuilding offsets" in caplog.text
    n = 30 if change == "append" else 20
    assert len(seq) == n and [seq[i][0][0] for i in range(n)] == [f"u{i}" for i in range(n)]


def test_fitting_offsets_are_used_silently(tmp_path, caplog):
    from dataset.seqfile import SeqFile

    p = tmp_path / "seq.jsonl"
    p.write_text("".join(json.dumps([[i, i, None, {}, 1, i]]) + "\n" for i in range(5)))
    (tmp_path / "seq_offsets.pkl").write_bytes(pickle.dumps(SeqFile(p).offsets.tolist()))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(SeqFile(p)) == 5
    assert "rebuilding" not in caplog.text


def test_seqfile_is_safe_in_forked_dataloader_workers(world):
    """Workers forked after the parent read a line must not share its file offset (garbled JSON otherwise)."""
    train, _ = world
    ds = TrainDataset(train, maxlen=20)
    ds[0]  # the parent opens the file
    seen = sum(len(b["seq"]) for b in DataLoader(ds, batch_size=4, num_workers=2))
    assert seen == len(ds)


def test_unreadable_offsets_are_rebuilt_with_a_warning(tmp_path, caplog):
    """An offsets file that cannot be read at all (here a folder in its place) costs a rescan, not the run."""
    _write_seq(tmp_path / "seq.jsonl", ['[[1, 2, null, {}, 0, 0]]', '[[3, 4, null, {}, 1, 0]]'])
    (tmp_path / "seq_offsets.pkl").mkdir()
    with caplog.at_level("WARNING"):
        sf = SeqFile(tmp_path / "seq.jsonl")
    assert len(sf) == 2 and sf[1][0][1] == 4
    assert "unreadable" in caplog.text


@pytest.mark.parametrize("offsets", [{"a": 1}, [2**70], [[0, 1]], {0: "x"}])
def test_odd_offsets_pickles_are_rebuilt(tmp_path, offsets):
    import pickle

    _write_seq(tmp_path / "seq.jsonl", ['[[1, 2, null, {}, 0, 0]]', '[[3, 4, null, {}, 1, 0]]'])
    (tmp_path / "seq_offsets.pkl").write_bytes(pickle.dumps(offsets))
    assert SeqFile(tmp_path / "seq.jsonl")[1][0][1] == 4
