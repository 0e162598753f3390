"""genrec/recommender/checkpoint.py: one atomic unit on disk, versioned configs, old checkpoints still load."""
from __future__ import annotations

import json

import pytest
import torch

from dataset.store import FeatureSchema
from genrec.recommender import checkpoint as ckmod
from genrec.recommender.checkpoint import FORMAT_VERSION, load_checkpoint, migrate, save_checkpoint
from genrec.recommender.recommender import ModelConfig, Recommender


def _model(seed: int = 0, **kw) -> Recommender:
    torch.manual_seed(seed)
    schema = FeatureSchema(num_items=50, num_users=10, item_sparse={"100": 5},
                           sid_levels=4, sid_codebook=8)
    return Recommender(schema, ModelConfig(hidden=8, maxlen=5, num_blocks=1, **kw))


def _weights(path) -> dict:
    return torch.load(path / "model.pt", weights_only=True)


def test_model_config_from_an_empty_dict_is_the_default():
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_a_version_1_config_without_later_fields_takes_the_first_model_s_behaviour(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", _model(item_bias=False, history_bias=False, logq=False,
                                                 sid_embedding="level", action_embedding=False, action_query=False),
                         {})
    meta = json.loads((ck / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    for k in ckmod._V1_MODEL_DEFAULTS:
        del meta["model"][k]
    meta["format_version"] = 1
    (ck / "config.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(ck)
    assert loaded.meta["format_version"] == FORMAT_VERSION
    assert loaded.model.cfg.action_query is False and loaded.model.cfg.sid_embedding == "level"
    assert loaded.model.cfg.item_bias is False


def test_a_config_without_a_version_is_version_1():
    assert migrate({"model": {}})["model"]["action_embedding"] is False


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "2", 0, True])
def test_a_config_of_an_unknown_version_is_one_line(tmp_path, version):
    ck = save_checkpoint(tmp_path / "ck", _model(), {})
    meta = json.loads((ck / "config.json").read_text())
    meta["format_version"] = version
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(ck)


@pytest.mark.parametrize("exchange", [True, False])
def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without renameat2's exchange: two renames
        monkeypatch.setattr(ckmod, "_exchange", lambda a, b: False)
    d = save_checkpoint(tmp_path / "ck", _model(0), {"run": 1}, semantic_ids={3: [1, 2, 3, 4]})
    (d / "stray.txt").write_text("from the old run")
    save_checkpoint(d, _model(1), {"run": 2})
    assert json.loads((d / "config.json").read_text())["train"] == {"run": 2}
    assert not (d / "semantic_id_dict.json").exists() and not (d / "stray.txt").exists()
    assert torch.equal(_weights(d)["pos.weight"], _model(1).state_dict()["pos.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no staging or old folder left


def test_an_interrupted_save_leaves_the_old_checkpoint_as_it_was(tmp_path, monkeypatch):
    d = save_checkpoint(tmp_path / "ck", _model(0), {"run": 1}, semantic_ids={3: [1, 2, 3, 4]})
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod, "write_json", killed)  # config.json, the last file, never written
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, _model(1), {"run": 2})
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    assert load_checkpoint(d).meta["train"] == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("damage", ["missing", "a folder", "corrupt"])
def test_the_checkpoint_s_ids_file_missing_unreadable_or_corrupt_is_one_warning(tmp_path, caplog, damage):
    """The same answer whatever is wrong with it: a warning naming it, the model served without those IDs."""
    d = save_checkpoint(tmp_path / "ck", _model(), {}, semantic_ids={3: [1, 2, 3, 4], 7: [0, 1, 2, 3]})
    assert load_checkpoint(d).trained_ids == {3: [1, 2, 3, 4], 7: [0, 1, 2, 3]}
    ids = d / "semantic_id_dict.json"
    ids.unlink()
    if damage == "a folder":
        ids.mkdir()
    elif damage == "corrupt":
        ids.write_text('{"3": [1, 2')
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(d)
    assert loaded.trained_ids == {}
    assert sum("semantic_id_dict.json" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 1
