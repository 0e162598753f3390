"""Shared fixtures: a tiny demo world and a tiny trained checkpoint (built once per test session)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from dataset.synth import SynthConfig, generate

TINY = SynthConfig(users=120, test_users=40, items=300, topics=6, min_len=8, max_len=30, mm=((81, 32), (82, 48)), seed=3)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every cache (mm_emb fallbacks, the demo world) out of the user's home, and every bench results file
    out of the repository's bench/results/."""
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("GENREC_BENCH_RESULTS", str(tmp_path_factory.mktemp("bench_results")))
    for var in ("EVAL_DATA_PATH", "EVAL_RESULT_PATH", "MODEL_OUTPUT_PATH", "ALLOW_SEMANTIC_GENERATION",
                "TRAIN_DATA_PATH", "TRAIN_CKPT_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def world_src(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("world")
    generate(root / "train", TINY, eval_out=root / "eval")
    return root / "train", root / "eval"


@pytest.fixture
def world(world_src, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny world (train dir, eval dir) that a test may modify."""
    train, ev = tmp_path / "train", tmp_path / "eval"
    shutil.copytree(world_src[0], train, ignore=shutil.ignore_patterns(".genrec_cache"))
    shutil.copytree(world_src[1], ev, ignore=shutil.ignore_patterns(".genrec_cache"))
    return train, ev


@pytest.fixture(scope="session")
def checkpoint(world_src, tmp_path_factory) -> Path:
    """A model trained for one epoch on the tiny world, with a bundled RQ-VAE."""
    from genrec.recommender.recommender import ModelConfig
    from genrec.recommender.trainer import TrainConfig, train

    src = tmp_path_factory.mktemp("trainsrc")
    shutil.copytree(world_src[0], src / "train")
    out = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig(data_dir=str(src / "train"), output_dir=str(out), epochs=1, batch_size=64,
                      model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64))
    logging.getLogger().setLevel(logging.INFO)
    return train(cfg)


@pytest.fixture(scope="session")
def gen_checkpoint(world_src, tmp_path_factory) -> Path:
    """The same with the generative head (two epochs: a head that has learnt something)."""
    from genrec.recommender.recommender import ModelConfig
    from genrec.recommender.trainer import TrainConfig, train

    src = tmp_path_factory.mktemp("gen_src")
    shutil.copytree(world_src[0], src / "train")
    out = tmp_path_factory.mktemp("gen") / "ck"
    return train(TrainConfig(data_dir=str(src / "train"), output_dir=str(out), epochs=2, batch_size=64,
                             model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64,
                                               generative_head=True)))
