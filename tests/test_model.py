"""genrec/recommender/: semantic-ID prefix embeddings, the loss (full softmax, sampled + logQ), validation rules, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataset import TrainDataset
from genrec.recommender.recommender import ModelConfig, Recommender, expected_negatives
from genrec.recommender.sid_embedding import PrefixVocab, SemanticIdEmbedding, prefix_values
from genrec.recommender.trainer import TrainConfig, evaluate, train


def _stored(codes: list[list[int]]) -> np.ndarray:
    """Codes as the item store keeps them: code + 1, 0 = no ID."""
    return np.asarray(codes, np.int64) + 1


def test_prefixes_share_rows_and_unseen_prefixes_get_none():
    train = _stored([[1, 2, 3, 4], [1, 2, 3, 5], [1, 7, 0, 0], [9, 9, 9, 9]])
    vocab = PrefixVocab.build(train, codebook=16, cap=1 << 10)
    assert vocab.rows == [2, 3, 3, 4] and [c.tolist() for c in vocab.counts][:2] == [[3, 1], [2, 1, 1]]
    emb = SemanticIdEmbedding(4, 16, 8, "prefix", vocab.rows, cap=1 << 10)
    emb.set_vocab(vocab)
    trained = np.array([True, True, True, True, False, False])
    rows, drop = emb.index(np.vstack([train, _stored([[1, 2, 6, 6], [5, 5, 5, 5]])]), trained)
    assert rows[0, 0] == rows[1, 0] == rows[2, 0] and rows[0, 1] == rows[1, 1] != rows[2, 1]  # (1) and (1, 2) shared
    assert rows[0, 3] != rows[1, 3]
    assert rows[4, :2].tolist() == rows[0, :2].tolist() and rows[4, 2:].tolist() == [0, 0]  # new item: seen prefixes only
    assert rows[5].tolist() == [0, 0, 0, 0]
    # Without its id a training item loses the prefixes no other training item has; a new item loses nothing more.
    assert drop[0].tolist() == [False, False, False, True] and drop[3].tolist() == [True] * 4
    assert not drop[4].any()
    no_id = np.zeros((1, 4), np.int64)  # an item without a semantic ID
    assert emb.index(no_id, np.array([True]))[0].tolist() == [[0, 0, 0, 0]]


def test_prefix_tables_stay_bounded_by_hashing():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (5000, 4))
    vocab = PrefixVocab.build(codes + 1, 256, cap=512)
    assert vocab.rows[0] == 256 and all(r <= 512 for r in vocab.rows) and vocab.hashed == [False, True, True, True]
    emb = SemanticIdEmbedding(4, 256, 8, "prefix", vocab.rows, cap=512)
    emb.set_vocab(vocab)
    rows, _ = emb.index(codes + 1, np.ones(5000, bool))
    assert (rows > 0).all() and rows.max() < emb.emb.num_embeddings


def test_prefix_values_are_exact_or_hashed_without_overflow():
    v = prefix_values(_stored([[1, 2, 3, 4]]), 256)
    assert v.tolist() == [[1, 1 * 256 + 2, (1 * 256 + 2) * 256 + 3, ((1 * 256 + 2) * 256 + 3) * 256 + 4]]
    wide = prefix_values(np.full((2, 12), 200, np.int64), 65536)  # 65536^12 overflows int64: rolling hash
    assert (wide >= 0).all() and wide[0].tolist() == wide[1].tolist()


def test_level_mode_keeps_coarse_levels_for_items_without_id():
    emb = SemanticIdEmbedding(4, 16, 8, "level", levels_without_id=2)
    rows, drop = emb.index(_stored([[1, 2, 3, 4]]), np.array([True]))
    assert rows.tolist() == [[1 + 1, 17 + 2, 33 + 3, 49 + 4]] and drop.tolist() == [[False, False, True, True]]


def test_expected_negative_counts():
    target = torch.tensor([0, 0, 0, 1])  # item 0 is three of the four next items
    e = expected_negatives(target, 3, k_random=10, n_items=100, k_inbatch=2)
    torch.testing.assert_close(e, torch.tensor([0.1 + 1.5, 0.1 + 0.5, 0.1]))


def _tiny_model(world, **cfg) -> tuple[Recommender, TrainDataset]:
    train_dir, _ = world
    ds = TrainDataset(train_dir, maxlen=20)
    torch.manual_seed(0)
    model = Recommender(ds.schema, ModelConfig(hidden=16, maxlen=20, num_blocks=1, use_semantic_ids=False, **cfg))
    model.items.set_store(ds.store)
    return model, ds


def _batch(ds: TrainDataset, n: int = 32) -> dict:
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_a_small_catalogue_is_scored_in_full(world):
    model, ds = _tiny_model(world, num_negatives=10_000, id_dropout=0.0)
    model.eval()
    b = _batch(ds)
    loss = model.loss(b)
    valid = b["pos"] > 0
    q, w = model.sequence(b["seq"], b["user_sparse"], b["user_array"], None, b["seq_action"], b["pos_action"])
    q = torch.cat([q[valid], w[valid][:, None]], -1)  # the query's bias component, as model.query has it
    items = model.item_vectors(torch.arange(1, ds.schema.num_items + 1))
    # retrieval scores / temperature are the training logits (cosine / temperature + item bias)
    full = torch.nn.functional.cross_entropy(q @ items.T / model.cfg.temperature, b["pos"][valid] - 1)
    torch.testing.assert_close(loss, full)


def test_logq_makes_the_sampled_gradient_follow_the_full_softmax(world):
    """In-batch negatives are popular items: uncorrected, they push popular items down harder than the full
    softmax does. Corrected, the expected gradient points where the full softmax's does."""
    model, ds = _tiny_model(world, num_negatives=64, id_dropout=0.0)
    model.eval()
    b = _batch(ds)

    def grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.cfg.num_negatives = 10_000
    full = grad(model.loss(b))
    model.cfg.num_negatives = 64
    err = {}
    for logq in (True, False):
        model.cfg.logq = logq
        g = torch.Generator().manual_seed(0)
        mean = torch.stack([grad(model.loss(b, g)) for _ in range(100)]).mean(0)
        err[logq] = float((mean - full).norm() / full.norm())
    assert err[True] < 0.7 * err[False], err


def test_validation_ranks_under_both_rules(world):
    model, ds = _tiny_model(world)
    val = ds.validation_samples()
    m = evaluate(model, val, torch.device("cpu"))
    assert set(m) == {"unfiltered", "filtered"} and m["filtered"]["users"] == m["unfiltered"]["users"] > 0
    assert m["filtered"]["hr@10"] > 0
    # a target the user already had can never be served under filtering: every such user is a miss
    val["history"] = torch.cat([val["history"], val["target"][:, None]], 1)
    m2 = evaluate(model, val, torch.device("cpu"))
    assert m2["filtered"]["hr@10"] == 0 and m2["unfiltered"]["users"] == m["unfiltered"]["users"]


def test_scan_counts_repeats_and_keeps_whole_histories(tmp_path):
    from dataset.synth import SynthConfig, generate

    generate(tmp_path, SynthConfig(users=30, test_users=2, items=40, topics=3, min_len=30, max_len=40, mm=((81, 4),)))
    ds = TrainDataset(tmp_path, maxlen=5)
    stats = ds.scan()
    assert 0.5 < stats.repeat_rate <= 1.0  # 40 items, 30+ interactions per user: most next items repeat
    val = stats.validation
    assert val["history"].shape[1] > 5  # the whole history, not the model's window of 5
    assert len(val["target"]) > 0
    for h, t, s in zip(val["history"], val["target"], val["seq"]):
        assert set(s[s > 0].tolist()) <= set(h.tolist())


def test_training_writes_its_own_ids_to_the_checkpoint_only(world, tmp_path):
    train_dir, _ = world
    cks = []
    for seed in (0, 1):
        cks.append(train(TrainConfig(data_dir=str(train_dir), output_dir=str(tmp_path / f"ck{seed}"), epochs=1,
                                     seed=seed, model=ModelConfig(hidden=16, maxlen=20, num_blocks=1))))
    assert not (train_dir / "semantic_id_dict.json").exists()  # the data dir is input only
    a, b = (json.loads((c / "semantic_id_dict.json").read_text()) for c in cks)
    assert a.keys() == b.keys() and a != b  # each seed trained its own RQ-VAE
    meta = json.loads((cks[0] / "config.json").read_text())
    assert meta["schema"]["sid_prefix_rows"] and isinstance(meta["train"]["filter_seen"], bool)
    assert set(meta["train"]["validation"]) == {"unfiltered", "filtered"}


@pytest.mark.parametrize("rule, expect", [(True, True), ("false", False)])  # the flag's word works too
def test_forced_filter_rule_is_recorded(world, tmp_path, rule, expect):
    train_dir, _ = world
    ck = train(TrainConfig(data_dir=str(train_dir), output_dir=str(tmp_path / "ck"), epochs=1, filter_seen=rule,
                           model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, use_semantic_ids=False)))
    meta = json.loads((ck / "config.json").read_text())
    assert meta["train"]["filter_seen"] is expect and list(meta["train"]["validation"]) == \
        ["filtered" if expect else "unfiltered"]


def test_bad_training_config_is_refused():
    with pytest.raises(ValueError, match="filter_seen"):
        TrainConfig(filter_seen="maybe")
    with pytest.raises(ValueError, match="sid_method"):
        TrainConfig(sid_method="pq")
    with pytest.raises(ValueError, match="sid_embedding"):
        SemanticIdEmbedding(4, 16, 8, "ngram")


def test_seen_masks_follow_the_causal_history():
    from genrec.recommender.recommender import _first_seen, _seen

    seq = torch.tensor([[0, 5, 7, 5]])  # left-padded; the query at position t has read seq[:t+1]
    index = {0: 0, 5: 1, 7: 2, 9: 3}  # item -> column of the index space
    first = _first_seen(seq.apply_(index.get), torch.tensor([[0, 5, 7, 5]]), 4)
    assert first.tolist() == [[4, 1, 2, 4]]  # padding and the absent item 9: never
    assert _seen(first, torch.tensor([1, 2, 3]), 4)[0].int().tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]


@pytest.mark.parametrize("full", [True, False])
def test_history_offset_learns_the_sign_of_repeats(world, full):
    """Where next items never repeat the history, the loss pushes the offset down; where they always repeat the
    last item, up. Both in the full softmax and in the sampled one."""
    model, ds = _tiny_model(world, num_negatives=10_000 if full else 16, id_dropout=0.0)
    b = _batch(ds)
    grads = {}
    for name in ("never", "always"):
        bb = dict(b)
        if name == "always":  # every next item is the item just read
            bb["pos"] = torch.where(b["pos"] > 0, b["seq"], 0)
        else:  # next items drawn from items outside the sequence
            outside = torch.tensor(sorted(set(range(1, ds.schema.num_items + 1)) - set(b["seq"].flatten().tolist())))
            bb["pos"] = torch.where(b["pos"] > 0, outside[torch.arange(b["pos"].numel()) % len(outside)].view_as(b["pos"]), 0)
        model.zero_grad()
        model.loss(bb, torch.Generator().manual_seed(0)).backward()
        grads[name] = float(model.seen_logit.grad)
    assert grads["never"] > 0 > grads["always"], grads


def test_item_bias_is_part_of_the_retrieval_score(world):
    model, ds = _tiny_model(world)
    slots = torch.arange(1, 11)
    raw = model.items(slots)
    v = model.item_vectors(slots)
    assert v.shape[1] == model.cfg.hidden + 1
    torch.testing.assert_close(v[:, -1], model.cfg.temperature * raw[:, -1])
    q = model.query(*(ds.validation_samples(5)[k] for k in ("seq", "user_sparse", "user_array")))
    assert torch.equal(q[:, -1], torch.ones(len(q)))


def test_checkpoints_of_the_first_version_load_as_they_were_trained():
    """A version-1 config.json written before a field existed takes that field's first-version value (through the
    checkpoint's migration), not today's default."""
    from genrec.recommender.checkpoint import migrate

    old = ModelConfig.from_dict(migrate({"model": {"hidden": 16, "num_negatives": 512}})["model"])
    assert (old.sid_embedding, old.item_bias, old.history_bias, old.logq) == ("level", False, False, False)
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


@pytest.mark.parametrize("full", [True, False])
def test_mask_seen_drops_history_items_from_the_negatives_but_never_the_target(world, full):
    """--mask_seen: fewer negatives can only lower the softmax loss (and must: history items are among them);
    a next item that repeats the history stays the target (finite loss)."""
    model, ds = _tiny_model(world, num_negatives=10_000 if full else 16, id_dropout=0.0)
    b = _batch(ds)
    outside = torch.tensor(sorted(set(range(1, ds.schema.num_items + 1)) - set(b["seq"].flatten().tolist())))
    never = dict(b, pos=torch.where(b["pos"] > 0, outside[torch.arange(b["pos"].numel()) % len(outside)].view_as(b["pos"]), 0))
    always = dict(b, pos=torch.where(b["pos"] > 0, b["seq"], 0))
    model.eval()  # no dropout: the two losses differ by the mask alone
    losses = {}
    for mask in (False, True):
        model.cfg.mask_seen = mask
        losses[mask] = [float(model.loss(bb, torch.Generator().manual_seed(0)).detach()) for bb in (never, always)]
    assert losses[True][0] < losses[False][0] - 1e-4, losses
    assert np.isfinite(losses[True][1]), losses
