"""The log's actions: the demo world's story, reading actions, weighting targets, conditioning the query on the
target's action, the competition's metric (a conversion weighs 2.5), and MovieLens ratings as actions."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import TestDataset, TrainDataset, load_pickle
from dataset.synth import SynthConfig, generate
from evalu.infer import InferConfig, run
from genrec.recommender.metrics import rank_metrics, target_weights
from genrec.recommender.recommender import ModelConfig, Recommender
from genrec.recommender.trainer import TrainConfig, parse_target_weights, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(users=400, test_users=60, items=300, topics=6, min_len=20, max_len=40, mm=((81, 8), (82, 64)), seed=5)


def _interactions(path: Path) -> list[list]:
    """Every interaction record of a .jsonl sequence file (profiles left out)."""
    return [r for line in path.read_text().splitlines() for r in json.loads(line) if r[1] is not None]


def _labels(ev: Path) -> list[dict]:
    return [json.loads(x) for x in (ev / "labels.jsonl").read_text().splitlines()]


def test_final_round_world_writes_conversions_and_the_action_file(tmp_path):
    generate(tmp_path / "f" / "train", SynthConfig(**SMALL, final_round=True), eval_out=tmp_path / "f" / "eval")
    generate(tmp_path / "p" / "train", SynthConfig(**SMALL), eval_out=tmp_path / "p" / "eval")
    final = [r[4] for r in _interactions(tmp_path / "f" / "train" / "seq.jsonl")]
    counts = np.bincount(final, minlength=3)
    assert counts[2] > 0 and counts[0] > 0.6 * len(final)  # conversions exist; most of the log is exposures
    first = [r[4] for r in _interactions(tmp_path / "p" / "train" / "seq.jsonl")]
    assert 2 not in first and sum(first) == counts[1] + counts[2]  # before the final round a conversion is a click
    assert not (tmp_path / "p" / "eval" / "user_action_type.json").exists()
    lf, lp = _labels(tmp_path / "f" / "eval"), _labels(tmp_path / "p" / "eval")
    assert {x["action_type"] for x in lf} == {1, 2} and {x["action_type"] for x in lp} == {1}
    assert [x["creative_id"] for x in lf] == [x["creative_id"] for x in lp]  # the same world, logged two ways
    types = json.loads((tmp_path / "f" / "eval" / "user_action_type.json").read_text())
    assert types == {x["user_id"]: x["action_type"] for x in lf}


def test_clicks_follow_quality_and_conversions_follow_propensity_as_content_tells(tmp_path):
    """Features 114 / 115 carry quality / propensity (noisily): the top tier is clicked when shown, and converts
    when clicked, far more often than the bottom tier."""
    generate(tmp_path, SynthConfig(**SMALL, final_round=True))
    recs = _interactions(tmp_path / "seq.jsonl")
    f114 = np.array([r[3]["114"] for r in recs])
    f115 = np.array([r[3]["115"] for r in recs])
    act = np.array([r[4] for r in recs])
    ctr = [np.mean(act[f114 == t] > 0) for t in (1, 5)]
    cvr = [np.mean(act[(f115 == t) & (act > 0)] == 2) for t in (1, 5)]
    assert ctr[1] > 1.5 * ctr[0], ctr
    assert cvr[1] > 2 * cvr[0], cvr


def test_the_next_click_follows_what_was_clicked_not_what_was_shown(tmp_path):
    """A click moves the user's interest: the next click shares the last click's feature 100 (the topic, for most
    items) more often than it shares the last exposure's."""
    generate(tmp_path, SynthConfig(**SMALL, interest_weight=1.5))
    after_click = after_shown = n = 0
    for line in (tmp_path / "seq.jsonl").read_text().splitlines():
        recs = [r for r in json.loads(line) if r[1] is not None]
        for k, r in enumerate(recs):
            if r[4] != 1 or k == 0:
                continue
            clicks = [p for p in recs[:k] if p[4] == 1]
            if clicks:
                n += 1
                after_click += clicks[-1][3]["100"] == r[3]["100"]
                after_shown += recs[k - 1][3]["100"] == r[3]["100"]
    assert n > 100 and after_click > after_shown, (after_click, after_shown, n)


@pytest.mark.parametrize("value", [3, -1, "x", None, 2**70, True, 1.0])
def test_unknown_actions_are_counted_and_never_a_target(world, value, caplog):
    train_dir, _ = world
    path = train_dir / "seq.jsonl"
    lines = path.read_text().splitlines()
    recs = json.loads(lines[0])
    n = 0
    for r in recs:
        if r[1] is not None:
            r[4] = value
            n += 1
    lines[0] = json.dumps(recs)
    path.write_text("\n".join(lines) + "\n")
    (train_dir / "seq_offsets.pkl").unlink()  # rebuilt from the file
    ds = TrainDataset(train_dir, maxlen=20)
    caplog.set_level(logging.WARNING)
    stats = ds.scan()
    assert stats.actions["unknown"] == n and "read as unknown" in caplog.text
    u = ds._parse(ds.seq[0], register_unseen=False)
    assert set(u["actions"]) == {3} and ds._holdout(u["actions"]) is None  # no click: nothing held out
    item = ds[0]
    assert set(item["seq_action"][item["seq"] > 0].tolist()) == {4}  # the unknown token (action 3 + 1)


def _tiny(world, **cfg) -> tuple[Recommender, TrainDataset, dict]:
    ds = TrainDataset(world[0], maxlen=20)
    torch.manual_seed(0)
    model = Recommender(ds.schema, ModelConfig(hidden=16, maxlen=20, num_blocks=1, use_semantic_ids=False,
                                               num_negatives=10_000, id_dropout=0.0, **cfg))
    model.items.set_store(ds.store)
    model.eval()  # no dropout: losses differ by what the test changes alone
    items = [ds[i] for i in range(32)]
    return model, ds, {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_target_weights_weigh_each_next_item_by_its_action(world):
    model, ds, b = _tiny(world)
    w = torch.tensor([0.0, 0.0, 1.0, 2.5, 0.0])  # padding, exposure 0, click 1, conversion 2.5, unknown 0
    exposure = b["pos_action"] == 1
    assert exposure.any() and (b["pos_action"] == 2).any()
    base = float(model.loss(b, None, w).detach())
    other = dict(b, pos=torch.where(exposure, 1 + (b["pos"] % ds.schema.num_items), b["pos"]))  # other exposures
    assert float(model.loss(other, None, w).detach()) == pytest.approx(base, rel=1e-6)  # weight 0: no say
    assert float(model.loss(other).detach()) != pytest.approx(float(model.loss(b).detach()), rel=1e-4)
    # the weighted mean of the per-target losses
    per_click = float(model.loss(b, None, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])).detach())
    assert min(per_click, base) - 1e-6 <= base <= max(per_click, base) + 1e-6


def test_the_query_follows_the_history_actions_and_the_target_action(world):
    model, ds, b = _tiny(world)
    with torch.no_grad():  # as if trained (both start at zero): every action its own token and conditioning
        model.action_film.weight.normal_()
        model.action_emb.weight[1:].normal_()
    seq, us, ua, sa = b["seq"], b["user_sparse"], b["user_array"], b["seq_action"]
    click, conv = (torch.full((len(seq),), t) for t in (2, 3))
    q = model.query(seq, us, ua, sa, click)
    assert not torch.allclose(q, model.query(seq, us, ua, sa, conv))
    assert torch.equal(q, model.query(seq, us, ua, sa))  # the default target is a click
    flipped = torch.where(sa == 1, 2, torch.where(sa == 2, 1, sa))  # exposures <-> clicks
    assert not torch.allclose(q, model.query(seq, us, ua, flipped, click))
    blind, _, _ = _tiny(world, action_embedding=False, action_query=False)
    qb = blind.query(seq, us, ua, sa, click)
    assert torch.equal(qb, blind.query(seq, us, ua, flipped, conv))  # the action-blind model ignores both


@pytest.mark.slow
def test_target_weights_flag_is_checked(tmp_path):
    assert parse_target_weights("0:0,1:1,2:2.5") == {0: 0.0, 1: 1.0, 2: 2.5}
    assert parse_target_weights("2:4") == {0: 1.0, 1: 1.0, 2: 4.0}
    for bad in ("0:-1", "1:0", "3:1", "x", "0:nan", "0:inf", "1"):
        with pytest.raises(ValueError, match="target_weights"):
            parse_target_weights(bad)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_dir", str(tmp_path), "--output_dir",
                        str(tmp_path / "o"), "--target_weights", "0:-1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "target_weights" in r.stderr


def test_the_metric_weighs_a_conversion_two_and_a_half_clicks():
    m = rank_metrics(np.array([1.0, np.inf]), target_weights(np.array([2, 1])))
    assert m["hr@10"] == pytest.approx(2.5 / 3.5)
    assert rank_metrics(np.array([1.0, np.inf]))["hr@10"] == 0.5


def test_validation_holds_out_the_last_click_or_conversion(tmp_path):
    generate(tmp_path, SynthConfig(**SMALL, final_round=True))
    ds = TrainDataset(tmp_path, maxlen=20)
    val = ds.validation_samples()
    assert set(val["target_action"].tolist()) == {2, 3}  # click and conversion tokens, never an exposure
    for i in range(20):
        u = ds._parse(ds.seq[i], register_unseen=False)
        cut = ds._holdout(u["actions"])
        assert u["actions"][cut] in (1, 2) and not any(a in (1, 2) for a in u["actions"][cut + 1:])


@pytest.fixture(scope="module")
def final_world(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A final-round world and a model trained on it for one epoch (train dir, eval dir, checkpoint)."""
    root = tmp_path_factory.mktemp("final")
    cfg = SynthConfig(users=150, test_users=40, items=200, topics=5, min_len=10, max_len=30, mm=((81, 8), (82, 32)),
                      seed=2, final_round=True)
    generate(root / "train", cfg, eval_out=root / "eval")
    ck = train(TrainConfig(data_dir=str(root / "train"), output_dir=str(root / "ck"), epochs=1,
                           model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64)))
    return root / "train", root / "eval", ck


def test_inference_reads_user_action_type_and_a_bad_file_costs_only_the_conditioning(final_world, tmp_path, caplog):
    _, ev_src, ck = final_world
    ev = tmp_path / "eval"
    shutil.copytree(ev_src, ev)
    cfg = InferConfig(data_dir=str(ev), model_dir=str(ck), result_dir=str(tmp_path / "res"))
    types = json.loads((ev / "user_action_type.json").read_text())
    users = list(types)
    types[users[0]], types[users[1]] = "x", 7  # two bad values: those users are clicks
    (ev / "user_action_type.json").write_text(json.dumps(types))
    ds = TestDataset(ev, schema=load_ck_schema(ck), maxlen=20)
    want = [3 if types.get(u) == 2 else 2 for u in ds.users]
    assert ds.target_actions.tolist() == want and ds.action_info["invalid"] == 2
    top, users, rep = run(cfg)
    assert rep["target_actions"]["conversions"] == want.count(3) > 0
    assert rep["metrics"]["overall"]["users"] == 40
    labels = _labels(ev)  # the metric: a conversion weighs 2.5, a label that is no click or conversion is not scored
    hits = {x["user_id"]: (x["creative_id"] in t, x["action_type"]) for x, t in zip(labels, top)}
    w = {u: 2.5 if a == 2 else 1.0 for u, (_, a) in hits.items()}
    assert rep["metrics"]["overall"]["hr@10"] == pytest.approx(sum(w[u] * h for u, (h, _) in hits.items()) / sum(w.values()))
    labels[0]["action_type"] = 0
    (ev / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    assert run(cfg)[2]["metrics"]["overall"]["users"] == 39
    for broken in ("[1, 2", "[1, 2]", "\xff\xfe"):
        (ev / "user_action_type.json").write_bytes(broken.encode("latin-1"))
        caplog.clear()
        caplog.set_level(logging.WARNING)
        top_b, users_b, rep_b = run(cfg)
        assert len(users_b) == 40 and all(len(t) == 10 for t in top_b)  # the results stay
        assert "error" in rep_b["target_actions"] and rep_b["target_actions"]["file"]
        assert sum("user_action_type.json" in r.message for r in caplog.records) == 1


def load_ck_schema(ck: Path):
    from genrec.recommender.checkpoint import load_checkpoint

    return load_checkpoint(ck).model.schema


def test_action_blind_training_and_checkpoints_from_before_actions_rank_as_they_did(final_world, tmp_path):
    train_dir, ev, _ = final_world
    ck = train(TrainConfig(data_dir=str(train_dir), output_dir=str(tmp_path / "blind"), epochs=1, use_actions=False,
                           model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64)))
    meta = json.loads((ck / "config.json").read_text())
    assert meta["model"]["action_embedding"] is False and meta["model"]["action_query"] is False
    assert not any(k.startswith("action_") for k in torch.load(ck / "model.pt", weights_only=True))
    cfg = InferConfig(data_dir=str(ev), model_dir=str(ck), result_dir=str(tmp_path / "res"))
    top, _, _ = run(cfg)
    for k in ("action_embedding", "action_query"):  # config.json as written before actions existed
        del meta["model"][k]
    meta["format_version"] = 1
    (ck / "config.json").write_text(json.dumps(meta))
    top_old, _, _ = run(InferConfig(**{**cfg.__dict__, "result_dir": str(tmp_path / "res2")}))
    assert top_old == top and any(top)


def test_ml100k_ratings_as_actions(tmp_path):
    """On a small copy in RecBole's atomic format: 1-3 stars an exposure, 4 a click, 5 a conversion; the target is
    each user's last 4- or 5-star rating, the ratings after it are dropped."""
    from dataset.convert_ml100k import CID_OFFSET, EMB_DIM, convert

    src = tmp_path / "src"
    src.mkdir()
    ratings = {"1": [5, 3, 4, 1, 5, 2, 2], "2": [4, 4, 3, 3, 4, 1], "3": [5, 1, 1]}  # user 3: too short a history
    rows = [f"{u}\t{i + 1}\t{r}\t{100 + t}" for u, rs in ratings.items() for t, (i, r) in enumerate(zip(range(7), rs))]
    (src / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       + "\n".join(rows) + "\n")
    (src / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                      + "".join(f"{i}\tfilm {i}\t199{i}\tDrama\n" for i in range(1, 8)))
    (src / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                      + "".join(f"{u}\t30\tM\tx\t0\n" for u in ratings))
    emb = np.eye(7, EMB_DIM, dtype=np.float32)
    out = convert(tmp_path / "out", src, embeddings=emb, ratings_as_actions=True)
    labels = _labels(out)
    assert [(x["user_id"], x["creative_id"] - CID_OFFSET, x["action_type"]) for x in labels] == \
        [("user_1", 5, 2), ("user_2", 5, 1)]
    seqs = [[r[4] for r in json.loads(line) if r[1] is not None] for line in
            (out / "predict_seq.jsonl").read_text().splitlines()]
    assert seqs == [[2, 0, 1, 0], [1, 1, 0, 0]]
    assert json.loads((out / "user_action_type.json").read_text()) == {"user_1": 2, "user_2": 1}
    plain = convert(tmp_path / "plain", src, embeddings=emb)  # without the flag: every rating a click, the last the target
    assert [(x["creative_id"] - CID_OFFSET, x["action_type"]) for x in _labels(plain)] == [(7, 1), (6, 1), (3, 1)]
    assert not (plain / "user_action_type.json").exists()
    assert load_pickle(out / "indexer.pkl")["u"] == {"user_1": 1, "user_2": 2, "user_3": 3}
