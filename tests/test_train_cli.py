"""train.py: the training CLI."""
from __future__ import annotations

import json


def test_train_cli_env_fallbacks(world, tmp_path, monkeypatch):
    import train as train_cli

    tr, _ = world
    monkeypatch.setenv("TRAIN_DATA_PATH", str(tr))
    monkeypatch.setenv("TRAIN_CKPT_PATH", str(tmp_path / "ck"))
    assert train_cli.main(["--epochs", "1", "--hidden", "16", "--maxlen", "20", "--num_negatives", "32"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model"]["hidden"] == 16 and cfg["rqvae"]["features"] == ["81"]
    assert (tmp_path / "ck" / "rqvae" / "rqvae_model.pt").is_file()
