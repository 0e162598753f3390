"""evalu/semantic_bootstrap.py: the lazy semantic-ID bootstrap, its env gate, every degradation path, concurrency."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset import TestDataset, load_semantic_ids
from evalu.infer import InferConfig, main, parse_args, run
from rqvae import RQVAEConfig

ROOT = Path(__file__).resolve().parents[1]


def _cfg(ev: Path, ckpt: Path, tmp_path: Path, **kw) -> InferConfig:
    return InferConfig(data_dir=str(ev), model_dir=str(ckpt), result_dir=str(tmp_path / "results"),
                       labels=str(ev / "labels.jsonl"), **kw)


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
    from evalu.semantic_bootstrap import id_file_check
    from genrec.recommender.checkpoint import load_checkpoint

    _, _, rep = run(_cfg(ev, ckpt, res))
    ck = load_checkpoint(ckpt)
    trained = ck.trained_ids
    ds = TestDataset(ev, schema=ck.model.schema, maxlen=ck.model.cfg.maxlen, sid_dirs=[res / "results"],
                     sid_accept=id_file_check(ck.rqvae, trained))
    return rep["semantic_id"], {c: ds.semantic_id_dict.get(c) for c in trained}


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


@pytest.mark.slow
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


def test_bootstrap_reuses_the_trained_ids_exactly(world, checkpoint, tmp_path):
    """IDs that re-encoding would not give: the checkpoint's (here altered) trained IDs are what is served."""
    import hashlib
    import shutil as sh

    from dataset.semantic_ids import save_semantic_ids
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    ck = tmp_path / "ck"
    sh.copytree(checkpoint, ck)
    trained = load_checkpoint(ck).trained_ids
    altered = {c: [(v + 17) % 256 for v in codes] for c, codes in trained.items()}
    save_semantic_ids(ck / "semantic_id_dict.json", altered)
    meta = json.loads((ck / "config.json").read_text())  # as if the model had been trained with them
    meta["parts"]["semantic_id_dict.json"] = hashlib.sha256((ck / "semantic_id_dict.json").read_bytes()).hexdigest()
    (ck / "config.json").write_text(json.dumps(meta))
    boot, served = _served(ev, ck, tmp_path / "r")
    assert boot["status"] == "encoded" and boot["generation"]["reused_ids"] == len(altered)
    assert served == altered


@pytest.mark.slow
def test_the_file_lock_makes_a_second_process_wait(tmp_path):
    """Two processes never generate into one folder at once: the second waits for the first's lock."""
    import time

    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\nfrom evalu.semantic_bootstrap import _file_lock\n"
            f"with _file_lock(Path({str(tmp_path)!r})):\n"
            f"    Path({str(tmp_path / 'held')!r}).write_text('1')\n    time.sleep(1.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        t0 = time.time()
        while not (tmp_path / "held").exists():
            assert time.time() - t0 < 60, "the lock holder never started"
            time.sleep(0.02)
        from evalu.semantic_bootstrap import _file_lock

        t = time.perf_counter()
        with _file_lock(tmp_path):
            waited = time.perf_counter() - t
    finally:
        holder.wait(timeout=60)
    assert waited > 0.8, waited


def test_a_lock_held_for_ever_costs_only_the_new_ids(world, checkpoint, tmp_path, monkeypatch):
    """Another process holds the IDs lock (stopped, hung): after GENREC_LOCK_TIMEOUT the bootstrap degrades to the
    checkpoint's IDs and the run still answers."""
    import threading

    from evalu.semantic_bootstrap import LOCK_FILE
    from genrec.core.lock import file_lock

    _, ev = world
    monkeypatch.setenv("GENREC_LOCK_TIMEOUT", "1")
    release, held = threading.Event(), threading.Event()

    def hold():
        with file_lock(ev / LOCK_FILE, timeout=5):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(5)
    try:
        top, users, rep = run(_cfg(ev, checkpoint, tmp_path))
    finally:
        release.set()
        t.join()
    assert rep["semantic_id"]["status"] == "failed" and "LockTimeout" in rep["semantic_id"]["warning"]
    assert len(top) == len(users) == 40 and all(len(x) == 10 for x in top)
    assert not (ev / LOCK_FILE).exists()


def test_a_checkpoint_whose_ids_or_rqvae_were_replaced_does_not_serve_them(world, checkpoint, checkpoint_b, tmp_path,
                                                                          caplog):
    """Parts written by something else into the checkpoint folder (another run, a half copy) are not served."""
    import shutil

    from genrec.recommender.checkpoint import load_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    shutil.copy(checkpoint_b / "semantic_id_dict.json", ck / "semantic_id_dict.json")
    shutil.rmtree(ck / "rqvae")
    shutil.copytree(checkpoint_b / "rqvae", ck / "rqvae")
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(ck)
    assert loaded.trained_ids == {} and loaded.rqvae is None
    assert load_checkpoint(checkpoint).trained_ids and load_checkpoint(checkpoint).rqvae is not None


def test_a_file_under_the_right_fingerprint_with_other_codes_is_not_served(world, checkpoint, tmp_path):
    """The fingerprint beside a file is not enough: its codes for the trained items must be the trained ones."""
    from dataset.semantic_ids import origin_record
    from genrec.recommender.checkpoint import load_checkpoint

    _, ev = world
    run(_cfg(ev, checkpoint, tmp_path))  # writes the eval dir's file under the checkpoint's fingerprint
    sids, _ = load_semantic_ids(ev / "semantic_id_dict.json")
    trained = load_checkpoint(checkpoint).trained_ids
    victim = next(c for c in trained if c in sids)
    sids[victim] = [(x + 1) % 256 for x in sids[victim]]
    (ev / "semantic_id_dict.json").write_text(json.dumps({str(k): v for k, v in sids.items()}))
    report = json.loads((ev / "semantic_id_report.json").read_text())  # the report vouches for these contents
    report["origin"] = origin_record(ev / "semantic_id_dict.json", load_checkpoint(checkpoint).rqvae.fingerprint())
    (ev / "semantic_id_report.json").write_text(json.dumps(report))
    boot, served = _served(ev, checkpoint, tmp_path / "again")
    assert any("disagrees" in why for why in boot["rejected"].values()), boot
    assert served[victim] == trained[victim]


def test_plot_draws_nothing_when_no_id_was_made(world, checkpoint, tmp_path, monkeypatch):
    """--plot on the usual path (every candidate's ID reused from the checkpoint, then loaded) draws nothing
    instead of an empty figure ("0 items, method ?")."""
    import rqvae.plot as plot

    drawn = []
    monkeypatch.setattr(plot, "require_matplotlib", lambda: None)
    monkeypatch.setattr(plot, "plot_report", lambda path: drawn.append(path) or Path(path).with_suffix(".png"))
    _, ev = world
    _, _, first = run(_cfg(ev, checkpoint, tmp_path, plot=True))
    _, _, again = run(_cfg(ev, checkpoint, tmp_path, plot=True))
    assert first["semantic_id"]["status"] == "encoded" and first["semantic_id"]["generation"]["items"] == 0
    assert again["semantic_id"]["status"] == "loaded"
    assert drawn == [] and "plot" not in first["semantic_id"] and "plot" not in again["semantic_id"]
