"""train.py stopped and resumed: the output folder changes only when a run ends, --resume continues exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genrec.core.cli import CliError
from genrec.recommender import trainer
from genrec.recommender.checkpoint import load_checkpoint, staging_dir
from genrec.recommender.recommender import ModelConfig
from genrec.recommender.trainer import TrainConfig, train

SMALL = dict(hidden=16, maxlen=20, num_blocks=1, num_negatives=64)


def _cfg(train_dir: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data_dir=str(train_dir), output_dir=str(out), batch_size=64, seed=kw.pop("seed", 0),
                       model=ModelConfig(**SMALL), **kw)


def _interrupt_at(monkeypatch, epoch: int) -> None:
    real = trainer.evaluate
    seen = {"n": 0}

    def evaluate(*a, **k):
        seen["n"] += 1
        if seen["n"] == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def _files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_interrupted_retrain_leaves_the_old_checkpoint_whole(world, tmp_path, monkeypatch):
    train_dir, _ = world
    ck = train(_cfg(train_dir, tmp_path / "ck", epochs=1))
    before = _files(ck)
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(train_dir, ck, epochs=3, seed=1))  # new IDs (another seed), stopped after epoch 1
    assert _files(ck) == before
    stage = staging_dir(ck)
    assert (stage / "train_state.pt").is_file() and (stage / "semantic_id_dict.json").is_file()
    meta = json.loads((stage / "config.json").read_text())
    assert meta["train"]["in_progress"] is True and len(meta["train"]["history"]) == 1  # the best so far


def test_resume_continues_exactly_where_the_run_stopped(world, tmp_path, monkeypatch):
    train_dir, _ = world
    straight = train(_cfg(train_dir, tmp_path / "straight", epochs=3))
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(train_dir, tmp_path / "resumed", epochs=3))
    assert not (tmp_path / "resumed").exists()  # nothing there until the run ends
    monkeypatch.undo()
    resumed = train(_cfg(train_dir, tmp_path / "resumed", epochs=3, resume=True))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert a.trained_ids == b.trained_ids and len(b.meta["train"]["history"]) == 3
    assert a.meta["train"]["history"] == b.meta["train"]["history"]  # epoch 3's loss too: the same batches
    assert not staging_dir(resumed).exists()


@pytest.mark.parametrize("change", [{"lr": 5e-3}, {"seed": 7}])
def test_resume_refuses_other_settings_and_a_missing_run(world, tmp_path, monkeypatch, change):
    train_dir, _ = world
    with pytest.raises(CliError, match="no interrupted run"):
        train(_cfg(train_dir, tmp_path / "ck", epochs=2, resume=True))
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(train_dir, tmp_path / "ck", epochs=2))
    monkeypatch.undo()
    with pytest.raises(CliError, match=next(iter(change))):
        train(_cfg(train_dir, tmp_path / "ck", epochs=2, resume=True, **change))


@pytest.mark.parametrize("epochs", [0, -1])
def test_no_epochs_is_refused_before_any_work(world, tmp_path, epochs):
    import train as train_cli

    train_dir, _ = world
    assert train_cli.main(["--data_dir", str(train_dir), "--output_dir", str(tmp_path / "ck"),
                           "--epochs", str(epochs)]) == 2
    assert not (tmp_path / "ck").exists() and not staging_dir(tmp_path / "ck").exists()


def test_infer_never_serves_a_staging_folder(world, tmp_path, monkeypatch):
    """MODEL_OUTPUT_PATH a folder of checkpoints: a training in progress there is not the newest checkpoint."""
    from evalu.infer import _find_checkpoint

    train_dir, _ = world
    done = train(_cfg(train_dir, tmp_path / "models" / "a", epochs=1))
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(train_dir, tmp_path / "models" / "b", epochs=2))
    assert staging_dir(tmp_path / "models" / "b").is_dir()
    assert _find_checkpoint(tmp_path / "models") == done
