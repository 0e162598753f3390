"""The data layer: safe pickles, sequence files, embeddings and their cache, semantic-ID files, datasets."""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset import (CorruptSemanticIdFile, DataFormatError, SeqFile, TestDataset, TrainDataset, UnsafePickleError,
                     load_feature, load_mm_emb, load_pickle, load_semantic_ids, save_semantic_ids)
from dataset.synth import SynthConfig, generate


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


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


def _emb_folder(root, fid, dim, lines, name="part-00000"):
    d = root / "creative_emb" / f"emb_{fid}_{dim}"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join(ln + "\n" for ln in lines))
    return d


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


def test_semantic_id_file_int_keys_and_invalid_entries(tmp_path):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text(json.dumps({"123": [1, 2, 3, 4], "x": [1, 2, 3, 4], "5": [1, 2, 3], "6": [1, 2, 3, 256],
                             "7": [0, 0, 0, 255], "8": "abc"}))
    sids, invalid = load_semantic_ids(p)
    assert sids == {123: [1, 2, 3, 4], 7: [0, 0, 0, 255]} and invalid == 4
    save_semantic_ids(p, sids)
    assert json.loads(p.read_text()) == {"7": [0, 0, 0, 255], "123": [1, 2, 3, 4]}


@pytest.mark.parametrize("content", ["", "   ", '{"1": [1, 2, 3, 4], "2": [1,', "[1, 2]"])
def test_empty_or_truncated_semantic_id_file_is_corrupt(tmp_path, content):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text(content)
    with pytest.raises(CorruptSemanticIdFile):
        load_semantic_ids(p)


def test_test_dataset_handles_raw_ids_unseen_items_and_string_values(world):
    _, ev = world
    ds = TestDataset(ev, maxlen=20)
    assert all(isinstance(u, str) and u.startswith("user_") for u in ds.users)
    assert ds.store.num_slots > ds.schema.num_items + 1  # unseen items got their own slots
    extra = ds.store.sparse[ds.schema.num_items + 1:]
    assert extra.min() >= 0
    fid101 = list(ds.schema.item_sparse).index("101")
    assert (extra[:, fid101] == 0).any()  # "unseen_x" string values -> 0
    assert ds.semantic_id_dict == {} and ds.semantic_id_coverage == 0.0
    batch = next(iter(DataLoader(ds, batch_size=8)))
    assert batch["seq"].shape == (8, 20) and batch["seq"].dtype == torch.long


def test_test_dataset_rebuild_picks_up_new_semantic_ids(world):
    _, ev = world
    ds = TestDataset(ev, maxlen=20)
    cid = int(ds.store.creative[ds.candidate_slots[0]])
    save_semantic_ids(ev / "semantic_id_dict.json", {cid: [1, 2, 3, 4]})
    ds.rebuild()
    assert ds.semantic_id_dict == {cid: [1, 2, 3, 4]}
    assert ds.store.sid[ds.candidate_slots[0]].tolist() == [2, 3, 4, 5]  # codes + 1, 0 = none


def test_train_dataset_batches_and_holdout(world):
    train, _ = world
    ds = TrainDataset(train, maxlen=20)
    b = next(iter(DataLoader(ds, batch_size=16, shuffle=True)))
    assert b["seq"].shape == b["pos"].shape == (16, 20)
    assert torch.equal(b["seq"] > 0, b["pos"] > 0)  # every input position has a next item, padding on the left
    assert torch.equal(b["seq"][:, 1:][b["seq"][:, :-1] > 0] > 0, torch.ones_like(b["seq"][:, 1:][b["seq"][:, :-1] > 0], dtype=torch.bool))
    val = ds.validation_samples()
    assert len(val["target"]) > 0 and (val["target"] > 0).all()


def test_synth_is_deterministic(tmp_path):
    cfg = SynthConfig(users=20, test_users=5, items=50, topics=3, min_len=5, max_len=10, mm=((81, 4),), seed=7)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    for name in ("seq.jsonl", "predict_seq.jsonl", "predict_set.jsonl", "item_feat_dict.json", "labels.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert load_pickle(tmp_path / "a" / "indexer.pkl") == load_pickle(tmp_path / "b" / "indexer.pkl")


def _world_items(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """A demo world's (item features by re-id, re-ids in training order, feature-82 rows by re-id)."""
    feats = {int(k): v for k, v in json.loads((path / "item_feat_dict.json").read_text()).items()}
    seen = [r[1] for line in (path / "seq.jsonl").read_text().splitlines() for r in json.loads(line) if r[1]]
    reid = load_pickle(path / "indexer.pkl")["i"]
    rows = {}
    for part in sorted((path / "creative_emb" / "emb_82_16").glob("part-*")):
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            if rec["anonymous_cid"] in reid:
                rows[reid[rec["anonymous_cid"]]] = rec["emb"]
    return feats, np.array(seen), rows


def test_synth_content_knobs_name_the_topic_and_the_popularity(tmp_path):
    """topic_share=1: feature 100 groups items of one topic (their feature-82 vectors agree more than at share 0);
    popularity_feature: feature 112 orders items by how often they are picked (noise by default)."""
    base = dict(users=300, test_users=5, items=200, topics=4, min_len=20, max_len=30, mm=((82, 16),), seed=4,
                mm_noise=((82, 0.1),))

    def same_f100_similarity(share: float) -> float:
        feats, _, rows = _world_items(generate(tmp_path / f"t{share}", SynthConfig(**base, topic_share=share)))
        ids = sorted(rows)
        v = np.array([rows[i] for i in ids])
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        f = np.array([feats[i]["100"] for i in ids])
        same = (f[:, None] == f[None]) & ~np.eye(len(ids), dtype=bool)
        return float((v @ v.T)[same].mean())

    assert same_f100_similarity(1.0) > same_f100_similarity(0.0) + 0.2

    def picks_by_f112(oracle: bool) -> np.ndarray:
        feats, seen, _ = _world_items(generate(tmp_path / f"p{oracle}", SynthConfig(**base, popularity_feature=oracle)))
        counts = np.bincount(seen, minlength=max(feats) + 1)
        f112 = np.array([feats[i]["112"] for i in range(1, max(feats) + 1)])
        return np.array([counts[1:][f112 == d].mean() for d in (1, 10)])

    low, high = picks_by_f112(True)
    assert high > 5 * low  # the top decile is picked far more often than the bottom one
    low, high = picks_by_f112(False)
    assert high < 2 * low and low < 2 * high


def test_seqfile_is_safe_in_forked_dataloader_workers(world):
    """Workers forked after the parent read a line must not share its file offset (garbled JSON otherwise)."""
    train, _ = world
    ds = TrainDataset(train, maxlen=20)
    ds[0]  # the parent opens the file
    seen = sum(len(b["seq"]) for b in DataLoader(ds, batch_size=4, num_workers=2))
    assert seen == len(ds)


def test_user_action_type_is_optional_and_checked(tmp_path):
    from dataset import load_action_types

    assert load_action_types(tmp_path / "user_action_type.json") == {}
    (tmp_path / "user_action_type.json").write_text('{"user_01": 1, "user_02": 2}')
    assert load_action_types(tmp_path / "user_action_type.json") == {"user_01": 1, "user_02": 2}
    (tmp_path / "user_action_type.json").write_text('[1, 2]')
    with pytest.raises(DataFormatError, match="user_action_type.json"):
        load_action_types(tmp_path / "user_action_type.json")


def _varied_rows(n: int, dim: int, seed: int = 0, id_max: int = 2**63 - 1) -> tuple[list[str], np.ndarray]:
    """Lines as real exports write them: shortest round-trip floats over many magnitudes, big and negative ids."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, dim)) * 10.0 ** rng.integers(-12, 6, size=(n, dim))).astype(np.float32)
    ids = rng.integers(-id_max, id_max, size=n, dtype=np.int64)
    lines = [json.dumps({"anonymous_cid": int(c), "emb": [float(v) for v in r]}) for c, r in zip(ids, x)]
    return lines, np.array([json.loads(ln)["emb"] for ln in lines], np.float32)


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


def test_candidate_pool_skips_bad_and_duplicate_lines(tmp_path, caplog):
    from dataset.files import load_predict_set

    rows = [{"creative_id": i, "retrieval_id": i, "features": {"100": 1}} for i in range(1, 6)]
    lines = [json.dumps(r) for r in rows]
    lines += [lines[2], json.dumps({"creative_id": 2**70, "retrieval_id": 9}),
              json.dumps({"creative_id": 8, "features": [1, 2]}), "[" * 100_000, "not json", lines[0]]
    p = tmp_path / "predict_set.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        pool = load_predict_set(p)
    assert pool.creative_ids.tolist() == [1, 2, 3, 4, 5]
    assert "skipped 6 candidate lines (duplicate: 2, unreadable: 4; first at line 6)" in caplog.text


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


def _crafted(tmp_path, data: bytes):
    p = tmp_path / "crafted.pkl"
    p.write_bytes(data)
    return p


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


def test_two_sources_of_one_feature_pick_the_expected_width_or_fail_clearly(tmp_path):
    emb = tmp_path / "creative_emb"
    emb.mkdir()
    (emb / "emb_81_16.pkl").write_bytes(pickle.dumps({1: np.ones(16, np.float32)}))
    _emb_folder(tmp_path, 81, 32, [json.dumps({"anonymous_cid": 1, "emb": [0.5] * 32})])
    assert load_mm_emb(emb, ["81"], dims={"81": 32})["81"].dim == 32
    assert load_mm_emb(emb, ["81"], dims={"81": 16})["81"].dim == 16
    with pytest.raises(DataFormatError, match=r"feature 81 has 2 sources \(emb_81_16.pkl: 16-d, emb_81_32: 32-d\)"):
        load_mm_emb(emb, ["81"])


def test_the_validation_click_is_never_a_training_target(world):
    train, _ = world
    ds = TrainDataset(train, maxlen=200, random_window=False)  # maxlen above every length: whole sequences
    checked = 0
    for i in range(len(ds)):
        u = ds._parse(ds.seq[i], register_unseen=False)
        cut = ds._holdout(u["actions"])
        if cut is None:
            continue
        pos = ds[i]["pos"]
        assert pos[pos > 0].tolist() == u["slots"][1:cut]  # the targets stop before the held-out click
        checked += 1
    assert checked > 50


def test_rank_metrics_against_hand_computed_values():
    import math

    from genrec.recommender.metrics import rank_metrics

    m = rank_metrics(np.array([1, 2, 3, 10, 11, np.inf]))
    hr = 4 / 6
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(11)) / 6
    assert m["users"] == 6 and m["hr@10"] == pytest.approx(hr) and m["ndcg@10"] == pytest.approx(ndcg)
    assert m["score"] == pytest.approx(0.31 * hr + 0.69 * ndcg)
    w = rank_metrics(np.array([1, np.inf]), weights=np.array([2.5, 1.0]))  # a conversion weighs 2.5
    assert w["hr@10"] == pytest.approx(2.5 / 3.5) and w["ndcg@10"] == pytest.approx(2.5 / 3.5)


def test_a_huge_line_is_skipped_without_reading_it_into_memory(tmp_path, monkeypatch):
    import dataset.mm_emb as mm

    good = [json.dumps({"anonymous_cid": i, "emb": [i, -i]}) for i in range(1, 200)]
    huge = '{"anonymous_cid": 999, "emb": [' + "1.0, " * 600_000 + '1.0]}'  # 3 MB, over the 1 MiB bound
    _emb_folder(tmp_path, 82, 2, good[:100] + [huge] + good[100:] + [huge])
    monkeypatch.setattr(mm, "_CHUNK_BYTES", 1 << 16)  # the huge lines span many chunks
    f = load_feature(tmp_path / "creative_emb", "82", use_cache=False)
    assert sorted(f.ids.tolist()) == list(range(1, 200)) and f.skipped == {"too_long": 2}


def test_semantic_id_file_with_huge_keys_or_deep_nesting(tmp_path):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text('{"99999999999999999999999": [1, 2, 3, 4], "5": [1, 2, 3, 4]}')
    ids, invalid = load_semantic_ids(p)
    assert ids == {5: [1, 2, 3, 4]} and invalid == 1
    p.write_text("[" * 100_000 + "]" * 100_000)
    from dataset import CorruptSemanticIdFile

    with pytest.raises(CorruptSemanticIdFile, match="RecursionError"):
        load_semantic_ids(p)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the parse pool needs 2 cores")
def test_parse_workers_die_with_a_killed_parent(tmp_path):
    import signal
    import subprocess
    import sys

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
