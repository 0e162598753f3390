"""evalu/generative.py and the generative head: a beam constrained to the pool's semantic IDs, hybrid serving."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evalu.generative import PoolIndex, beam_search, generative_topk
from genrec.recommender.recommender import GenerativeHead


def _pool(n: int, levels: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (n, levels))


@pytest.mark.parametrize("flag_limit", [PoolIndex.FLAG_LIMIT, 0])
def test_a_constrained_beam_never_leaves_the_pool(flag_limit, monkeypatch):
    """A sparse pool (40 IDs of 8^4): every ID the beam returns is one of the pool's; without the constraint an
    untrained head returns IDs that are not. Both ways of finding a prefix's children: flag tables, searchsorted."""
    monkeypatch.setattr(PoolIndex, "FLAG_LIMIT", flag_limit)
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


@pytest.mark.parametrize("flag_limit", [PoolIndex.FLAG_LIMIT, 0])
def test_a_prefix_children_are_the_pool_ids_that_extend_it(flag_limit, monkeypatch):
    monkeypatch.setattr(PoolIndex, "FLAG_LIMIT", flag_limit)
    codes = _pool(300, 3, 6, seed=2)
    index = PoolIndex(codes, 6)
    assert all(r is None for r in index._rows) == (flag_limit == 0)
    for level in range(2):
        prefixes = torch.arange(6 ** (level + 1)).view(-1, 3)
        want = {tuple(c[:level + 2]) for c in codes.tolist()}
        got = index.children(prefixes, level)
        for p, row in zip(prefixes.flatten().tolist(), got.view(-1, 6)):
            digits = np.unravel_index(p, (6,) * (level + 1))
            assert [c for c in range(6) if row[c]] == sorted(c for c in range(6) if (*map(int, digits), c) in want)


def test_a_beam_wider_than_the_pool_returns_every_id_once_and_pads():
    codes = np.array([[0, 1], [0, 2], [3, 3]])
    ids, logp, invalid = beam_search(GenerativeHead(4, 2, 4), torch.randn(2, 4), PoolIndex(codes, 4), width=6)
    assert invalid == 0
    for row in ids:
        assert sorted(row[row >= 0].tolist()) == [1, 2, 15] and (row == -1).sum() == 3


def _one(ids, index, q, cand, k, hist, offset, hybrid):
    top, n = generative_topk(np.array([ids]), index, q[None], cand, k, [np.asarray(hist, np.int64)], offset, hybrid)
    return top[0].tolist(), n


def test_colliding_items_are_reached_through_their_id_and_ranked_by_the_dense_score():
    codes = np.array([[1, 1], [1, 1], [2, 0], [-1, -1], [3, 3]])  # 0 and 1 share an ID; 3 has none; 4 is new
    index = PoolIndex(codes, 4, unseen=np.array([False, False, False, False, True]))
    cand = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [5.0, 0.0], [0.7, 0.0]])
    q = torch.tensor([1.0, 0.0])
    top, n = _one([5, 8], index, q, cand, 3, [], 0.0, hybrid=False)
    assert top == [1, 0, 2] and n == 3  # the beam's first ID (both items, dense order), then the second
    top, n = _one([5, 8, 15], index, q, cand, 3, [], 0.0, hybrid=False)
    assert top == [1, 0, 2] and n == 4  # a new item's ID is reachable by the beam (last here)
    top, n = _one([5, 8], index, q, cand, 3, [], 0.0, hybrid=True)
    assert top == [3, 1, 4] and n == 5  # hybrid: the items the beam cannot reach compete on the dense score
    top, _ = _one([5, 8, 15], index, q, cand, 5, [], 0.0, hybrid=True)
    assert top == [3, 1, 4, 2, 0]  # item 4 through the beam and as unreachable: once
    top, _ = _one([5, 8], index, q, cand, 3, [3, 1], float("-inf"), hybrid=True)
    assert top == [4, 2, 0]  # history (3 and 1) filtered
    top, _ = _one([5, 8], index, q, cand, 5, [3, 1], -0.6, hybrid=True)
    assert top == [3, 4, 2, 1, 0]  # ... or scored with the history offset: 5.0 - 0.6, 0.9 - 0.6


def _reference_top(ids, index, codes, query, cand, k, history, offset, hybrid):
    """One user, item by item: the definition generative_topk vectorises."""
    full = [int(np.ravel_multi_index(tuple(c), (index.codebook,) * index.levels)) if (c >= 0).all() else -1
            for c in codes]
    pos, rank = [], []
    for r, i in enumerate(ids[ids >= 0].tolist()):
        for p, f in enumerate(full):
            if f == i:
                pos.append(p)
                rank.append(0 if hybrid else r)
    if hybrid:
        pos = sorted(set(pos) | set(index.unreachable.tolist()))
        rank = [0] * len(pos)
    scored = []
    for p, r in zip(pos, rank):
        d = float(cand[p] @ query) + (offset if p in set(history.tolist()) else 0.0)
        if d != float("-inf"):
            scored.append((r, -d, p))
    return [p for _, _, p in sorted(scored)[:k]] + [-1] * max(0, k - len(scored))


@pytest.mark.parametrize("budget", [10, 1 << 20])
@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("offset", [float("-inf"), -0.3, 0.0])
def test_the_batched_top_k_is_the_per_user_definition(hybrid, offset, budget):
    """Collisions (a 3 x 3 ID space for 60 items), items without an ID, new items, histories, the whole batch as
    one block or cut into blocks: every user's list is the one item-by-item scoring gives."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, (60, 2))
    codes[rng.random(60) < 0.15] = -1
    index = PoolIndex(codes, 3, unseen=rng.random(60) < 0.2)
    cand, q = torch.randn(60, 5), torch.randn(12, 5)
    ids = np.stack([rng.permutation(9)[:4] for _ in range(12)])
    ids[3, 2:] = -1  # a beam that found fewer IDs
    hist = [rng.choice(60, rng.integers(0, 6), replace=False) for _ in range(12)]
    top, n = generative_topk(ids, index, q, cand, 7, hist, offset, hybrid, budget=budget)
    for u in range(12):
        assert top[u].tolist() == _reference_top(ids[u], index, codes, q[u], cand, 7, hist[u], offset, hybrid), u
    assert n > 0


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


def test_a_beam_too_narrow_for_ten_items_says_so(world, gen_checkpoint, tmp_path, caplog):
    from evalu.infer import InferConfig, run

    _, ev = world
    top, _, rep = run(InferConfig(data_dir=str(ev), model_dir=str(gen_checkpoint), result_dir=str(tmp_path / "r"),
                                  retrieval="generative", beam_width=2))
    short = sum(len(t) < 10 for t in top)
    assert short > 0 and rep["retrieval"]["users_short_of_10"] == short
    assert f"{short} users got fewer than 10 items" in caplog.text


def test_generative_retrieval_without_a_head_is_one_line(world, checkpoint, tmp_path, capsys):
    from evalu.infer import main

    _, ev = world
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r"),
                 "--retrieval", "hybrid"]) == 2
    assert "no generative head" in capsys.readouterr().err


def test_the_head_trains_jointly_with_the_dense_loss(world):
    """The loss carries generative_weight x the head's cross-entropy over the next items that have an ID, and its
    gradient reaches the head."""
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
