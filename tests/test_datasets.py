"""dataset/datasets.py and files.py: the training and test datasets, the candidate pool."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from dataset import DataFormatError, TestDataset, TrainDataset, save_semantic_ids


def test_test_dataset_handles_raw_ids_unseen_items_and_string_values(world):
    _, ev = world
    ds = TestDataset(ev, maxlen=20)
    assert len(ds.users) == 40 and all(isinstance(u, str) and u.startswith("user_") for u in ds.users)
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


def test_user_action_type_is_optional_and_checked(tmp_path):
    from dataset import load_action_types

    assert load_action_types(tmp_path / "user_action_type.json") == {}
    (tmp_path / "user_action_type.json").write_text('{"user_01": 1, "user_02": 2}')
    assert load_action_types(tmp_path / "user_action_type.json") == {"user_01": 1, "user_02": 2}
    (tmp_path / "user_action_type.json").write_text('[1, 2]')
    with pytest.raises(DataFormatError, match="user_action_type.json"):
        load_action_types(tmp_path / "user_action_type.json")


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
