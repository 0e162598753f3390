"""evalu/generative.py and the generative head: a beam constrained to the pool's semantic IDs, hybrid serving."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evalu.generative import PoolIndex, beam_search, generative_top
from genrec.recommender.recommender import GenerativeHead


def _pool(n: int, levels: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (n, levels))


def test_a_constrained_beam_never_leaves_the_pool():
    """A sparse pool (40 IDs of 8^4): every ID the beam returns is one of the pool's; without the constraint an
    untrained head returns IDs that are not."""
    torch.manual_seed(0)
    codes = _pool(40, 4, 8)
    index, head = PoolIndex(codes, 8), GenerativeHead(16, 4, 8)
    q = torch.randn(32, 16)
    pool_ids = {int(((c[0] * 8 + c[1]) * 8 + c[2]) * 8 + c[3]) for c in codes}
    ids, logp, invalid = beam_search(head, q, index, width=5)
    assert ids.shape == (32, 5) and invalid == 0
    assert set(ids[ids >= 0].tolist()) <= pool_ids and (ids >= 0).all()
    assert np.all(np.diff(logp, axis=1) <= 1e-6)  # best first
    free, _, invalid_free = beam_search(head, q, index, width=5, constrained=False)
    assert invalid_free > 0 and not set(free[free >= 0].tolist()) <= pool_ids


def test_a_beam_wider_than_the_pool_returns_every_id_once_and_pads():
    codes = np.array([[0, 1], [0, 2], [3, 3]])
    ids, logp, invalid = beam_search(GenerativeHead(4, 2, 4), torch.randn(2, 4), PoolIndex(codes, 4), width=6)
    assert invalid == 0
    for row in ids:
        assert sorted(row[row >= 0].tolist()) == [1, 2, 15] and (row == -1).sum() == 3


def test_colliding_items_are_reached_through_their_id_and_ranked_by_the_dense_score():
    codes = np.array([[1, 1], [1, 1], [2, 0], [-1, -1], [3, 3]])  # 0 and 1 share an ID; 3 has none; 4 is new
    index = PoolIndex(codes, 4, unseen=np.array([False, False, False, False, True]))
    cand = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [5.0, 0.0], [0.7, 0.0]])
    q = torch.tensor([1.0, 0.0])
    top, n = generative_top(np.array([5, 8]), index, q, cand, 3, np.zeros(0, np.int64), 0.0, hybrid=False)
    assert top.tolist() == [1, 0, 2] and n == 3  # the beam's first ID (both items, dense order), then the second
    top, n = generative_top(np.array([5, 8]), index, q, cand, 3, np.zeros(0, np.int64), 0.0, hybrid=True)
    assert top.tolist() == [3, 1, 4] and n == 5  # hybrid: the items the beam cannot reach compete on the dense score
    top, _ = generative_top(np.array([5, 8]), index, q, cand, 3, np.array([3, 1]), float("-inf"), hybrid=True)
    assert top.tolist() == [4, 2, 0]  # history (3 and 1) filtered


@pytest.fixture(scope="module")
def gen_checkpoint(world_src, tmp_path_factory):
    import shutil

    from genrec.recommender.recommender import ModelConfig
    from genrec.recommender.trainer import TrainConfig, train

    src = tmp_path_factory.mktemp("gen_src")
    shutil.copytree(world_src[0], src / "train")
    out = tmp_path_factory.mktemp("gen") / "ck"
    return train(TrainConfig(data_dir=str(src / "train"), output_dir=str(out), epochs=2, batch_size=64,
                             model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64,
                                               generative_head=True)))


@pytest.mark.parametrize("retrieval", ["generative", "hybrid"])
def test_generative_and_hybrid_serving_answer_from_the_pool(world, gen_checkpoint, tmp_path, retrieval):
    from evalu.infer import InferConfig, run

    _, ev = world
    assert any(k.startswith("gen.") for k in torch.load(gen_checkpoint / "model.pt", weights_only=True))
    cfg = InferConfig(data_dir=str(ev), model_dir=str(gen_checkpoint), result_dir=str(tmp_path / "r"),
                      retrieval=retrieval, beam_width=8, filter_seen=True)
    top, users, rep = run(cfg)
    pool = {json.loads(ln)["creative_id"] for ln in (ev / "predict_set.jsonl").read_text().splitlines()}
    assert len(top) == len(users) == 40 and all(t and len(set(t)) == len(t) <= 10 and set(t) <= pool for t in top)
    assert rep["retrieval"]["invalid_ids"] == 0 and rep["retrieval"]["beam_width"] == 8
    if retrieval == "hybrid":
        assert all(len(t) == 10 for t in top)


def test_generative_retrieval_without_a_head_is_one_line(world, checkpoint, tmp_path, capsys):
    from evalu.infer import main

    _, ev = world
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r"),
                 "--retrieval", "hybrid"]) == 2
    assert "no generative head" in capsys.readouterr().err


def test_the_head_trains_jointly_with_the_dense_loss(world):
    """The loss carries generative_weight x the head's cross-entropy over the next items that have an ID, and its
    gradient reaches the head."""
    from dataclasses import replace

    from dataset import TrainDataset
    from genrec.recommender.recommender import ModelConfig, Recommender

    train_dir, _ = world
    ds = TrainDataset(train_dir, maxlen=20)
    rng = np.random.default_rng(0)
    creatives = ds.store.creative[1:ds.schema.num_items + 1]
    ds.store.attach_semantic_ids({int(c): rng.integers(0, 256, 4).tolist() for c in creatives})
    items = [ds[i] for i in range(32)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        cfg = ModelConfig(hidden=16, maxlen=20, num_blocks=1, generative_head=True, generative_weight=weight,
                          sid_embedding="level", dropout=0.0, id_dropout=0.0)
        model = Recommender(ds.schema, cfg)
        model.items.set_store(ds.store)
        loss = model.loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        losses[weight] = float(loss)
        grad = sum(float(p.grad.abs().sum()) for p in model.gen.parameters() if p.grad is not None)
        assert (grad > 0) == (weight > 0)
    assert losses[1.0] - losses[0.0] > 3.0  # about ln(256) = 5.5 per level for an untrained head
