"""evalu/infer.py: the lazy bootstrap, its env gate, every degradation path, concurrency, retrieval, output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset import load_semantic_ids
from evalu.infer import InferConfig, infer, main, parse_args, run
from evalu.retrieval import topk_faiss, topk_inner_product, topk_shortlist
from rqvae import RQVAEConfig

ROOT = Path(__file__).resolve().parents[1]


def _cfg(ev: Path, ckpt: Path, tmp_path: Path, **kw) -> InferConfig:
    return InferConfig(data_dir=str(ev), model_dir=str(ckpt), result_dir=str(tmp_path / "results"),
                       labels=str(ev / "labels.jsonl"), **kw)


def test_first_run_generates_second_run_loads(world, checkpoint, tmp_path, caplog):
    _, ev = world
    with caplog.at_level("INFO"):
        top, users, rep = run(_cfg(ev, checkpoint, tmp_path))
    log = caplog.text
    order = ["no semantic_id found, trying to generate...", "saved semantic_id to", "generated semantic_id for"]
    assert all(s in log for s in order) and log.index(order[0]) < log.index(order[1]) < log.rindex(order[2])
    assert rep["semantic_id"]["status"] == "encoded"  # the checkpoint's RQ-VAE, no training
    assert rep["semantic_id"]["coverage_before"] == 0.0 and rep["semantic_id"]["coverage_after"] > 0.8
    assert (ev / "semantic_id_dict.json").is_file()
    caplog.clear()
    with caplog.at_level("INFO"):
        top2, _, rep2 = run(_cfg(ev, checkpoint, tmp_path))
    assert rep2["semantic_id"]["status"] == "loaded" and "loaded semantic_id for" in caplog.text
    assert "trying to generate" not in caplog.text
    assert top2 == top


def test_ids_match_the_ones_the_model_was_trained_with(world, checkpoint, tmp_path):
    _, ev = world
    run(_cfg(ev, checkpoint, tmp_path))
    trained, _ = load_semantic_ids(checkpoint / "semantic_id_dict.json")
    served, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    assert trained and all(served[k] == v for k, v in trained.items())


def test_missing_candidates_are_encoded_with_the_checkpoint_rqvae(world, checkpoint, tmp_path):
    _, ev = world
    run(_cfg(ev, checkpoint, tmp_path))
    sids, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    drop = sorted(sids)[:20]
    kept = {k: v for k, v in sids.items() if k not in drop}
    (ev / "semantic_id_dict.json").write_text(json.dumps({str(k): v for k, v in kept.items()}))
    _, _, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert rep["semantic_id"]["status"] == "loaded+encoded"
    again, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    assert all(again[k] == sids[k] for k in drop)  # same codebooks -> the same IDs


def test_env_gate_never_trains(world, checkpoint, tmp_path, monkeypatch, caplog):
    _, ev = world
    monkeypatch.setenv("ALLOW_SEMANTIC_GENERATION", "false")
    cfg = InferConfig.from_env_and_args(parse_args(["--data_dir", str(ev), "--model_dir", str(checkpoint),
                                                    "--result_dir", str(tmp_path / "r")]))
    assert cfg.allow_semantic_generation is False
    with caplog.at_level("WARNING"):
        top, _, rep = run(cfg)
    assert rep["semantic_id"]["status"] == "disabled" and "ALLOW_SEMANTIC_GENERATION" in caplog.text
    assert not (ev / "semantic_id_dict.json").exists() and len(top) == 40


def test_no_creative_emb_degrades_and_exits_zero(world, checkpoint, tmp_path, monkeypatch, caplog):
    import shutil

    _, ev = world
    shutil.rmtree(ev / "creative_emb")
    monkeypatch.setenv("EVAL_DATA_PATH", str(ev))
    monkeypatch.setenv("MODEL_OUTPUT_PATH", str(checkpoint))
    monkeypatch.setenv("EVAL_RESULT_PATH", str(tmp_path / "res"))
    with caplog.at_level("WARNING"):
        assert main([]) == 0
    from genrec.recommender.checkpoint import load_checkpoint

    trained = load_checkpoint(checkpoint).trained_ids
    assert f"serving the checkpoint's IDs for the {len(trained)} items it was trained with" in caplog.text
    res = json.loads((tmp_path / "res" / "result.json").read_text())
    assert len(res["top10s"]) == len(res["user"]) == 40 and all(len(t) == 10 for t in res["top10s"])
    rep = json.loads((tmp_path / "res" / "infer_report.json").read_text())
    assert rep["semantic_id"]["status"] == "failed" and rep["semantic_id"]["items"] == len(trained) > 0


@pytest.mark.parametrize("failure", [torch.cuda.OutOfMemoryError("CUDA out of memory on every device"),
                                     MemoryError(), OSError(28, "No space left on device")])
def test_generation_failures_degradation_is_for_degrade(world, checkpoint, tmp_path, monkeypatch, failure):
    import evalu.semantic_bootstrap as sb

    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(sb, "generate_semantic_ids", fail)
    _, ev = world
    top, users, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert rep["semantic_id"]["status"] == "failed" and type(failure).__name__ in rep["semantic_id"]["warning"]
    assert len(top) == len(users) == 40 and all(len(t) == 10 for t in top)


def test_a_bug_inside_generation_is_not_served_as_failed(world, checkpoint, tmp_path, monkeypatch, capsys):
    """A TypeError (a refactoring slip) surfaces: exit 1 with its traceback, no result.json."""
    import evalu.semantic_bootstrap as sb
    from evalu.infer import main

    def bug(*a, **k):
        raise TypeError("generate_semantic_ids() got an unexpected keyword argument 'x'")

    monkeypatch.setattr(sb, "generate_semantic_ids", bug)
    _, ev = world
    res = tmp_path / "res"
    with pytest.raises(TypeError, match="unexpected keyword"):
        main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(res)])
    assert not (res / "result.json").exists()


def test_corrupt_file_is_regenerated(world, checkpoint, tmp_path, caplog):
    _, ev = world
    (ev / "semantic_id_dict.json").write_text('{"123": [1, 2')
    with caplog.at_level("WARNING"):
        _, _, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert "corrupt" in caplog.text and rep["semantic_id"]["status"] == "encoded"
    sids, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    assert len(sids) > 100


def test_read_only_data_dir_writes_to_results_and_later_runs_find_it(world, checkpoint, tmp_path, monkeypatch, caplog):
    import evalu.semantic_bootstrap as sb
    import rqvae.generate as gen

    _, ev = world
    real = sb.is_writable_dir
    ro = lambda p: Path(p).resolve() != ev.resolve() and real(p)  # noqa: E731 (root ignores chmod, so we patch)
    monkeypatch.setattr(sb, "is_writable_dir", ro)
    monkeypatch.setattr(gen, "is_writable_dir", ro)
    with caplog.at_level("WARNING"):
        _, _, rep = run(_cfg(ev, checkpoint, tmp_path))
    assert "read-only" in caplog.text
    assert not (ev / "semantic_id_dict.json").exists()
    assert (tmp_path / "results" / "semantic_id_dict.json").is_file()
    _, _, rep2 = run(_cfg(ev, checkpoint, tmp_path))
    assert rep2["semantic_id"]["status"] == "loaded"
    assert rep2["semantic_id"]["path"] == str(tmp_path / "results" / "semantic_id_dict.json")


def test_model_without_rqvae_trains_a_new_one(world, checkpoint, tmp_path, caplog):
    import shutil

    _, ev = world
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    shutil.rmtree(ck / "rqvae")
    (ck / "semantic_id_dict.json").unlink()
    with caplog.at_level("WARNING"):
        _, _, rep = run(_cfg(ev, ck, tmp_path, mm_emb_id=["81"]), RQVAEConfig(num_epochs=2, codebook_size=32))
    assert rep["semantic_id"]["status"] == "trained" and "carries no RQ-VAE" in caplog.text


def test_two_concurrent_runs_never_corrupt_the_file(world, checkpoint, tmp_path):
    _, ev = world
    env = {**os.environ, "EVAL_DATA_PATH": str(ev), "MODEL_OUTPUT_PATH": str(checkpoint)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "evalu" / "infer.py")],
                              env={**env, "EVAL_RESULT_PATH": str(tmp_path / f"r{i}")}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sids, invalid = load_semantic_ids(ev / "semantic_id_dict.json")
    assert invalid == 0 and len(sids) > 100
    r0, r1 = (json.loads((tmp_path / f"r{i}" / "result.json").read_text()) for i in range(2))
    assert r0["top10s"] == r1["top10s"]
    assert not [f for f in ev.iterdir() if f.name.endswith(".tmp")]
    status = sorted(json.loads((tmp_path / f"r{i}" / "infer_report.json").read_text())["semantic_id"]["status"]
                    for i in range(2))
    assert status == ["encoded", "loaded"]  # under the lock the second finds the first's file


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
    from dataset import TestDataset
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
    from dataset import TestDataset

    top, users, _ = run(_cfg(ev, checkpoint, tmp_path, filter_seen=True))
    ds = TestDataset(ev, maxlen=20)
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


def test_chunked_retrieval_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, items = torch.randn(37, 8, generator=g), torch.randn(1000, 8, generator=g)
    s, i = topk_inner_product(q, items, 10, user_chunk=7, item_chunk=64)
    ref = (q @ items.T).topk(10, dim=1)
    assert torch.equal(i, ref.indices) and torch.allclose(s, ref.values)
    ex = [np.asarray(ref.indices[u, :3]) for u in range(37)]
    _, i2 = topk_inner_product(q, items, 10, exclude=ex, item_chunk=100)
    assert torch.equal(i2[:, :7], ref.indices[:, 3:])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("offset", [-0.7, 0.4])
def test_history_offset_retrieval_equals_brute_force(backend, offset):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    q, items = torch.randn(40, 8, generator=g), torch.randn(500, 8, generator=g)
    ex = [np.unique(np.asarray(torch.randint(0, 500, (30,), generator=g))) for _ in range(40)]
    full = q @ items.T
    for u in range(40):
        full[u, ex[u]] += offset
    ref = full.topk(10, dim=1)
    if backend == "faiss":
        s, i = topk_faiss(q.numpy(), items.numpy(), 10, ex, offset)
        s, i = torch.as_tensor(s), torch.as_tensor(i)
    else:
        s, i = topk_inner_product(q, items, 10, exclude=ex, offset=offset, item_chunk=128)
    assert torch.equal(i, ref.indices) and torch.allclose(s, ref.values, atol=1e-5)


def _assert_same_top(s, i, ref_s, ref_i, tol=1e-6):
    """The same scores, and the same items wherever scores differ by more than fp32 rounding (two fp32 kernels
    may order items within an ulp of each other differently)."""
    assert torch.allclose(s, ref_s, atol=tol, rtol=0)
    for u in range(len(s)):
        tied = (ref_s[u][:, None] - ref_s[u][None, :]).abs() < tol
        for p in (i[u] != ref_i[u]).nonzero()[:, 0].tolist():
            assert i[u, p].item() in ref_i[u][tied[p]].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [float("-inf"), -0.3, 0.4, None])
def test_low_precision_shortlist_returns_the_float32_top10(dtype, offset):
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(300, 24, generator=g), dim=1)
    items = F.normalize(torch.randn(5000, 24, generator=g), dim=1)
    ex = None if offset is None else [np.asarray(torch.randint(0, 5000, (40,), generator=g)) for _ in range(300)]
    off = float("-inf") if offset is None else offset
    ref_s, ref_i = topk_inner_product(q, items, 10, ex, offset=off)
    stats = {}
    s, i = topk_shortlist(q, items, 10, ex, off, dtype, groups=16, group=8, item_chunk=1024, stats=stats)
    _assert_same_top(s, i, ref_s, ref_i)
    assert stats["users"] == 300 and stats["fallback_users"] < 300  # the shortlist proved most users


@pytest.mark.parametrize("tied", [200, 3000])
def test_low_precision_shortlist_falls_back_where_rounding_hides_the_winner(tied):
    """`tied` items tie with the true best in bf16 (their first coordinates round to the same value): 16 groups of
    8 cannot tell them apart and the proof fails; 128 groups hold all of 200 (second pass), not all of 3000 (those
    users are scored again in fp32). The answer is the fp32 one every time."""
    q = torch.zeros(5, 8)
    q[:, 0] = 1.0
    items = torch.zeros(tied + 100, 8)
    items[:, 1] = torch.linspace(-1, 1, len(items))  # no contribution to the score: q is zero there
    items[:tied, 0] = 0.5 + 0.0005 * torch.rand(tied, generator=torch.Generator().manual_seed(0))
    items[137, 0] = 0.5016  # best exactly, the same bf16 value as the others (spacing 2^-8 at 0.5)
    assert len(set(items[:tied, 0].bfloat16().tolist())) == 1
    ref_s, ref_i = topk_inner_product(q, items, 10)
    assert (ref_i[:, 0] == 137).all()
    stats = {}
    s, i = topk_shortlist(q, items, 10, dtype=torch.bfloat16, groups=16, group=8, stats=stats)
    assert torch.equal(i, ref_i) and torch.equal(s, ref_s)
    assert stats["second_pass_users"] == 5 and stats["fallback_users"] == (5 if tied > 16 * 8 * 8 else 0)


def test_low_precision_shortlist_edges():
    g = torch.Generator().manual_seed(4)
    q, items = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)  # fewer items than k
    ref_s, ref_i = topk_inner_product(q, items, 10)
    s, i = topk_shortlist(q, items, 10)
    assert torch.equal(i, ref_i) and (i[:, 6:] == -1).all() and torch.isinf(s[:, 6:]).all()
    ex = [np.arange(6), np.array([0, 0, 2]), np.array([], np.int64)]  # all excluded / duplicates / none
    for off in (float("-inf"), 0.5):
        ref_s, ref_i = topk_inner_product(q, items, 10, ex, offset=off)
        s, i = topk_shortlist(q, items, 10, ex, off)
        _assert_same_top(s, i, ref_s, ref_i)
    s, i = topk_shortlist(q[:0], items, 10)
    assert s.shape == (0, 10)
    big = torch.full((2, 8), 300.0)  # |q| |v| beyond fp16's range: scored in bf16 instead of inf
    s, i = topk_shortlist(big, torch.cat([big, -big]), 1, dtype=torch.float16)
    assert torch.isfinite(s).all() and (i[:, 0] < 2).all()


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
    from dataset import TestDataset
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
    import dataset.synth as synth
    from conftest import TINY

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


def test_train_cli_env_fallbacks(world, tmp_path, monkeypatch):
    import train as train_cli

    tr, _ = world
    monkeypatch.setenv("TRAIN_DATA_PATH", str(tr))
    monkeypatch.setenv("TRAIN_CKPT_PATH", str(tmp_path / "ck"))
    assert train_cli.main(["--epochs", "1", "--hidden", "16", "--maxlen", "20", "--num_negatives", "32"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model"]["hidden"] == 16 and cfg["rqvae"]["features"] == ["81"]
    assert (tmp_path / "ck" / "rqvae" / "rqvae_model.pt").is_file()


def test_grouped_block_topk_matches_plain_topk_with_ties_and_exclusions():
    from evalu.retrieval import _block_topk

    g = torch.Generator().manual_seed(1)
    s = torch.randn(50, 4096, generator=g).round(decimals=1)  # many ties
    s[3] = float("-inf")
    s[4, :100] = 10.0
    vals, idx = _block_topk(s.clone(), 10)
    ref = s.topk(10, dim=1).values
    assert torch.equal(vals, ref)
    assert torch.equal(s.gather(1, idx), vals)  # the indices point at those values
    q, items = torch.randn(300, 16, generator=g), torch.randn(20000, 16, generator=g)
    ex = [np.arange(u, 20000, 97) for u in range(300)]
    sc, ix = topk_inner_product(q, items, 10, exclude=ex)
    full = q @ items.T
    for u in range(300):
        full[u, ex[u]] = float("-inf")
    ref = full.topk(10, dim=1)
    assert torch.allclose(sc, ref.values) and torch.equal(ix, ref.indices)


@pytest.fixture(scope="session")
def checkpoint_b(world_src, tmp_path_factory) -> Path:
    """A second model on the same world with another seed: its RQ-VAE, hence its IDs, differ from `checkpoint`'s."""
    import shutil as sh

    from genrec.recommender.recommender import ModelConfig
    from genrec.recommender.trainer import TrainConfig, train

    src = tmp_path_factory.mktemp("trainsrc_b")
    sh.copytree(world_src[0], src / "train")
    out = tmp_path_factory.mktemp("ckpt_b")
    return train(TrainConfig(data_dir=str(src / "train"), output_dir=str(out), epochs=1, batch_size=64, seed=1,
                             model=ModelConfig(hidden=16, maxlen=20, num_blocks=1, num_negatives=64)))


def _served(ev: Path, ckpt: Path, res: Path) -> tuple[dict, dict]:
    """(the bootstrap's report, creative id -> the IDs the model was served for its training items)."""
    from dataset import TestDataset
    from evalu.semantic_bootstrap import id_file_check
    from genrec.recommender.checkpoint import load_checkpoint

    _, _, rep = run(_cfg(ev, ckpt, res))
    ck = load_checkpoint(ckpt)
    trained = ck.trained_ids
    ds = TestDataset(ev, schema=ck.model.schema, maxlen=ck.model.cfg.maxlen, sid_dirs=[res / "results"],
                     sid_accept=id_file_check(ck.rqvae, trained))
    return rep["semantic_id"], {c: ds.semantic_id_dict.get(c) for c in trained}


def test_another_models_ids_are_never_served(world, checkpoint, checkpoint_b, tmp_path, caplog):
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    trained_a, trained_b = load_checkpoint(checkpoint).trained_ids, load_checkpoint(checkpoint_b).trained_ids
    assert any(trained_a[c] != trained_b.get(c) for c in trained_a)  # the two RQ-VAEs do differ
    boot, served = _served(ev, checkpoint, tmp_path / "ra")
    assert boot["status"] == "encoded" and (ev / "semantic_id_dict.json").is_file()  # A's IDs land in the data dir
    assert served == trained_a
    with caplog.at_level("WARNING"):
        boot, served = _served(ev, checkpoint_b, tmp_path / "rb")
    assert boot["status"] == "replaced" and "made by another RQ-VAE" in caplog.text
    assert str(ev / "semantic_id_dict.json") in caplog.text
    assert served == trained_b  # B's own IDs, written to B's results dir; A's file untouched
    boot, served = _served(ev, checkpoint_b, tmp_path / "rb")
    assert boot["status"] == "loaded" and served == trained_b  # next time: B's file, found in the results dir
    boot, served = _served(ev, checkpoint, tmp_path / "ra")
    assert boot["status"] == "loaded" and served == trained_a


def test_ids_of_unknown_origin_are_served_only_when_they_agree(world, checkpoint, tmp_path):
    from dataset.semantic_ids import load_semantic_ids, save_semantic_ids
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    trained = load_checkpoint(checkpoint).trained_ids
    run(_cfg(ev, checkpoint, tmp_path / "r0"))
    (ev / "semantic_id_report.json").unlink()  # origin unknown from now on
    boot, served = _served(ev, checkpoint, tmp_path / "r1")
    assert boot["status"] == "loaded" and served == trained  # agrees: accepted
    ids, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    some = next(iter(trained))
    ids[some] = [(c + 1) % 256 for c in ids[some]]
    save_semantic_ids(ev / "semantic_id_dict.json", ids)
    boot, served = _served(ev, checkpoint, tmp_path / "r2")
    assert boot["status"] == "replaced" and "disagrees with the checkpoint's IDs on 1 of" in str(boot["rejected"])
    assert served == trained


@pytest.mark.parametrize("damage", ["truncated", "garbage config", "empty"])
def test_a_broken_rqvae_in_the_checkpoint_degrades_to_its_trained_ids(world, checkpoint, tmp_path, damage, caplog):
    import shutil as sh

    from evalu.infer import main
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    ck = tmp_path / "ck"
    sh.copytree(checkpoint, ck)
    rq = ck / "rqvae"
    if damage == "truncated":
        (rq / "rqvae_model.pt").write_bytes((rq / "rqvae_model.pt").read_bytes()[:100])
    elif damage == "garbage config":
        (rq / "rqvae_config.json").write_text('{"in_dim": "x"')
    else:
        sh.rmtree(rq)
        rq.mkdir()
    trained = load_checkpoint(checkpoint).trained_ids
    with caplog.at_level("WARNING"):
        assert main(["--data_dir", str(ev), "--model_dir", str(ck), "--result_dir", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "infer_report.json").read_text())
    assert rep["semantic_id"]["status"] == "checkpoint" and rep["semantic_id"]["items"] == len(trained)
    assert "RQ-VAE cannot be loaded" in caplog.text or "no RQ-VAE in the checkpoint" in caplog.text


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

    from dataset.synth import SynthConfig, generate
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


def test_bootstrap_reuses_the_trained_ids_exactly(world, checkpoint, tmp_path):
    """IDs that re-encoding would not give: the checkpoint's (here altered) trained IDs are what is served."""
    import shutil as sh

    from dataset.semantic_ids import save_semantic_ids
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    ck = tmp_path / "ck"
    sh.copytree(checkpoint, ck)
    trained = load_checkpoint(ck).trained_ids
    altered = {c: [(v + 17) % 256 for v in codes] for c, codes in trained.items()}
    save_semantic_ids(ck / "semantic_id_dict.json", altered)
    boot, served = _served(ev, ck, tmp_path / "r")
    assert boot["status"] == "encoded" and boot["generation"]["reused_ids"] == len(altered)
    assert served == altered



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
