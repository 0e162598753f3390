"""evalu/infer.py: the entry point, its output, flags, metrics, bad checkpoints and test data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataset import TestDataset
from dataset.synth import SynthConfig, generate
from evalu.infer import InferConfig, infer, main, parse_args, run


def _cfg(ev: Path, ckpt: Path, tmp_path: Path, **kw) -> InferConfig:
    return InferConfig(data_dir=str(ev), model_dir=str(ckpt), result_dir=str(tmp_path / "results"),
                       labels=str(ev / "labels.jsonl"), **kw)


def test_infer_returns_competition_shape(world, checkpoint, tmp_path, monkeypatch):
    _, ev = world
    monkeypatch.setenv("EVAL_DATA_PATH", str(ev))
    monkeypatch.setenv("MODEL_OUTPUT_PATH", str(checkpoint))
    monkeypatch.setenv("EVAL_RESULT_PATH", str(tmp_path / "r"))
    top10s, users = infer()
    assert len(top10s) == len(users) == 40
    pool = {json.loads(ln)["creative_id"] for ln in (ev / "predict_set.jsonl").read_text().splitlines()}
    assert all(len(t) == 10 and len(set(t)) == 10 and set(t) <= pool for t in top10s)
    assert users[0] == "user_00000000"


def test_item_with_no_features_at_all_still_gets_a_vector(world, checkpoint, tmp_path):
    _, ev = world
    lines = (ev / "predict_set.jsonl").read_text().splitlines()
    lines.append(json.dumps({"creative_id": 987654321, "retrieval_id": len(lines), "features": {}}))
    (ev / "predict_set.jsonl").write_text("\n".join(lines) + "\n")
    from genrec.recommender.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    ds = TestDataset(ev, schema=model.schema, maxlen=model.cfg.maxlen)
    model.items.set_store(ds.store)
    slot = ds.candidate_slots[-1]
    assert ds.store.sid[slot].tolist() == [0, 0, 0, 0] and ds.store.sparse[slot].tolist() == [0] * len(model.schema.item_sparse)
    with torch.no_grad():
        v = model.item_vectors(torch.tensor([slot]))
    # a unit vector, then (item_bias) the learnt bias: any finite value
    assert torch.isfinite(v).all() and abs(float(v[..., :model.cfg.hidden].norm()) - 1) < 1e-5
    top, _, _ = run(_cfg(ev, checkpoint, tmp_path))
    assert len(top) == 40


def test_filter_seen_drops_history_items(world, checkpoint, tmp_path):
    _, ev = world

    top, users, _ = run(_cfg(ev, checkpoint, tmp_path, filter_seen=True))
    ds = TestDataset(ev, maxlen=20)
    assert len(top) == len(ds.histories) == 40 and all(len(t) == 10 for t in top)  # never vacuous
    for t, h in zip(top, ds.histories):
        assert not set(t) & set(ds.store.creative[h].tolist())


def test_history_filtering_defaults_to_the_checkpoints_choice_and_both_flags_override(world, checkpoint, tmp_path):
    _, ev = world
    meta = json.loads((checkpoint / "config.json").read_text())
    chosen = meta["train"]["filter_seen"]
    assert parse_args(["--filter-seen"]).filter_seen is True and parse_args(["--no-filter-seen"]).filter_seen is False
    assert parse_args(["--no_filter_seen"]).filter_seen is False and parse_args([]).filter_seen is None
    _, _, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert rep["filter_seen"] is chosen
    for flag in (True, False):
        _, _, rep = run(_cfg(ev, checkpoint, tmp_path, filter_seen=flag))
        assert rep["filter_seen"] is flag


def test_infer_reports_the_score_dtype_and_answers_the_same(world, checkpoint, tmp_path):
    tr, ev = world
    out = {}
    for dt in ("float32", "bfloat16"):
        top, users, rep = run(_cfg(ev, checkpoint, tmp_path / dt, score_dtype=dt))
        assert rep["retrieval"]["score_dtype"] == dt and rep["retrieval"]["backend"] == "torch"
        out[dt] = (top, users)
    assert out["float32"] == out["bfloat16"]
    assert "rescored_in_float32" in rep["retrieval"]


def test_unfiltered_inference_serves_the_learnt_history_offset(world, checkpoint, tmp_path):
    """Without --filter-seen the model's own offset for history items decides: strongly negative, they vanish
    from the top 10; strongly positive, they fill it."""
    import evalu.infer as infer_mod

    _, ev = world
    ds = TestDataset(ev, maxlen=20)
    pool = set(ds.candidates.creative_ids.tolist())
    hist = [set(ds.store.creative[h].tolist()) & pool for h in ds.histories]
    orig = infer_mod.load_checkpoint
    shares = {}
    for value in (-1e4, 1e4):
        def patched(d, dev, value=value):
            ck = orig(d, dev)
            ck.model.seen_logit.data.fill_(value)
            return ck
        infer_mod.load_checkpoint = patched
        try:
            top, _, _ = run(_cfg(ev, checkpoint, tmp_path, filter_seen=False))
        finally:
            infer_mod.load_checkpoint = orig
        shares[value] = [len(set(t) & h) for t, h in zip(top, hist)]
    assert sum(shares[-1e4]) == 0 and shares[1e4] == [min(10, len(h)) for h in hist], shares


def test_metrics_are_reported_overall_and_cold(world, checkpoint, tmp_path):
    _, ev = world
    _, _, rep = run(_cfg(ev, checkpoint, tmp_path))
    m = rep["metrics"]
    assert set(m) == {"overall", "cold_start", "warm"}
    assert m["overall"]["users"] == 40 and m["cold_start"]["users"] + m["warm"]["users"] == 40
    o = m["overall"]
    assert abs(o["score"] - (0.31 * o["hr@10"] + 0.69 * o["ndcg@10"])) < 1e-12


def test_demo_world_is_created_trained_once_and_reused(monkeypatch, caplog):
    """With no paths set, infer.py makes the demo world and a model on the first run and reuses both."""
    from conftest import TINY

    import dataset.synth as synth

    monkeypatch.setattr(synth, "SynthConfig", lambda: TINY)
    with caplog.at_level("INFO"):
        assert main([]) == 0
    assert "creating the demo world" in caplog.text and "training a small one once" in caplog.text
    assert "no semantic_id found, trying to generate..." in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([]) == 0
    assert "creating the demo world" not in caplog.text and "training a small one" not in caplog.text
    assert "loaded semantic_id for" in caplog.text
    from genrec.core.safeio import cache_root
    res = json.loads((cache_root() / "demo" / "results" / "result.json").read_text())
    assert len(res["user"]) == TINY.test_users and "time" in res


@pytest.mark.parametrize("what,content", [("config.json", "{}"), ("config.json", "[" * 100_000),
                                          ("model.pt", b"\x80\x02garbage"), ("model.pt", b"")])
def test_a_broken_checkpoint_is_one_line(world, checkpoint, tmp_path, what, content, caplog):
    import shutil as sh

    from evalu.infer import main

    _, ev = world
    ck = tmp_path / "ck"
    sh.copytree(checkpoint, ck)
    (ck / what).write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["--data_dir", str(ev), "--model_dir", str(ck), "--result_dir", str(tmp_path / "r")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(ck / what) in errors[0]


@pytest.mark.parametrize("field,value", [("user", {"a": 1}), ("user", [1]), ("user", 1.5), ("item", 2**70),
                                         ("item", 1.5), ("item", "abc"), ("features", [1, 2])])
def test_odd_values_in_a_test_sequence_never_drop_a_user(world, checkpoint, tmp_path, field, value):
    _, ev = world
    lines = (ev / "predict_seq.jsonl").read_text().splitlines()
    recs = json.loads(lines[3])
    pos = {"user": 0, "item": 1, "features": 3}[field]
    recs[0][pos] = value
    lines[3] = json.dumps(recs)
    (ev / "predict_seq.jsonl").write_text("\n".join(lines) + "\n")
    (ev / "predict_seq_offsets.pkl").unlink()
    top, users, _ = run(_cfg(ev, checkpoint, tmp_path))
    assert len(users) == len(top) == 40 and all(len(t) == 10 for t in top)
    if field == "user":
        assert users[3] == json.dumps(value, separators=(",", ":"))


def test_a_broken_test_sequence_line_is_one_line_naming_it(world, checkpoint, tmp_path, caplog):
    from evalu.infer import main

    _, ev = world
    lines = (ev / "predict_seq.jsonl").read_text().splitlines()
    lines[5] = "[" * 100_000 + "]" * 100_000
    (ev / "predict_seq.jsonl").write_text("\n".join(lines) + "\n")
    (ev / "predict_seq_offsets.pkl").unlink()
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "predict_seq.jsonl: line 6" in errors[0]


def test_indexer_of_another_world_is_a_warning(world, checkpoint, tmp_path, caplog):
    import shutil as sh

    from conftest import TINY

    _, ev = world
    generate(tmp_path / "other", SynthConfig(**{**TINY.__dict__, "items": 350, "seed": 9}))
    with caplog.at_level("WARNING"):
        run(_cfg(ev, checkpoint, tmp_path / "a"))
    assert "do not match the checkpoint's training data" not in caplog.text  # its own world: silent
    for name in ("indexer.pkl", "item_feat_dict.json"):
        sh.copy(tmp_path / "other" / name, ev / name)
    caplog.clear()
    with caplog.at_level("WARNING"):
        top, users, _ = run(_cfg(ev, checkpoint, tmp_path / "b"))
    assert "do not match the checkpoint's training data" in caplog.text and "items in indexer.pkl" in caplog.text
    assert len(users) == 40


@pytest.mark.parametrize("flags, name", [(["--commitment_cost", "nan"], "--commitment_cost"),
                                         (["--hidden_dims", "0"], "--hidden_dims"),
                                         (["--kmeans_sample", "0"], "--kmeans_sample"),
                                         (["--num_quantizers", "5"], "--num_quantizers"),
                                         (["--codebook_size", "512"], "--codebook_size")])
def test_impossible_rqvae_settings_stop_inference_before_any_work(world, checkpoint, tmp_path, capsys, flags, name):
    """Exit 2 and one line; no results folder, no IDs file written into the data dir."""
    _, ev = world
    before = sorted(p.name for p in ev.iterdir())
    res = tmp_path / "res"
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(res), *flags]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not res.exists() and sorted(p.name for p in ev.iterdir()) == before


def test_a_huge_embedding_value_is_skipped_and_no_score_is_ever_nan(world, checkpoint, tmp_path, monkeypatch):
    """One finite but huge value (1e30) in the row of an item in many histories: the row is skipped and counted,
    every query and every score stays finite, every user gets 10 items."""
    from collections import Counter

    import evalu.infer as infer_mod
    from dataset import TestDataset, load_feature
    from genrec.recommender.recommender import Recommender

    _, ev = world
    ds = TestDataset(ev, maxlen=20)
    popular = Counter(int(c) for h in ds.histories for c in ds.store.creative[h].tolist() if c).most_common(1)[0][0]
    folder = ev / "creative_emb" / "emb_81_32"  # the feature the model reads
    for part in sorted(folder.iterdir()):
        lines = part.read_text().splitlines()
        for i, ln in enumerate(lines):
            row = json.loads(ln)
            if row["anonymous_cid"] == popular:
                row["emb"][3] = 1e30
                lines[i] = json.dumps(row)
        part.write_text("\n".join(lines) + "\n")
    assert load_feature(ev / "creative_emb", "81").skipped == {"huge": 1}
    seen = {"queries": [], "scores": []}
    real_query, real_topk = Recommender.query, infer_mod.topk_scored

    def query(self, *a, **k):
        q = real_query(self, *a, **k)
        seen["queries"].append(bool(torch.isfinite(q).all()))
        return q

    def topk(q, c, *a, **k):
        seen["scores"].append(bool(torch.isfinite(q.float() @ c.float().T).all()))
        return real_topk(q, c, *a, **k)

    monkeypatch.setattr(Recommender, "query", query)
    monkeypatch.setattr(infer_mod, "topk_scored", topk)
    top, users, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert seen["queries"] and all(seen["queries"]) and seen["scores"] and all(seen["scores"])
    assert len(top) == 40 and all(len(t) == 10 for t in top)
    assert "nonfinite_queries" not in rep["retrieval"]


@pytest.mark.parametrize("retrieval", ["torch", "faiss"])
def test_an_empty_candidate_pool_is_one_line_not_empty_lists(world, checkpoint, tmp_path, capsys, retrieval):
    if retrieval == "faiss":
        pytest.importorskip("faiss")
    _, ev = world
    (ev / "predict_set.jsonl").write_text("")
    res = tmp_path / "res"
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(res),
                 "--retrieval", retrieval]) == 1
    err = capsys.readouterr().err
    assert "no usable candidate" in err and "Traceback" not in err and not (res / "result.json").exists()
