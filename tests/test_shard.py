"""Inference past one process: torchrun ranks (gloo, 2 CPU processes) and no-network shards + merge, each
identical to the single-process result."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genrec.core.safeio import DataFormatError

ROOT = Path(__file__).resolve().parents[1]

# Small chunks so that both ranks embed candidates and score users on the tiny world.
LAUNCH = """
import sys
sys.path.insert(0, {root!r})
import evalu.shard as shard
shard.CAND_CHUNK = 64
from evalu.infer import main
sys.exit(main(sys.argv[1:]))
"""


def _single(ev: Path, ck: Path, out: Path, *extra: str) -> dict:
    from evalu.infer import main

    assert main(["--data_dir", str(ev), "--model_dir", str(ck), "--result_dir", str(out), "--query_batch_size", "8",
                 *extra]) == 0
    return json.loads((out / "result.json").read_text())


def _torchrun(tmp_path: Path, ev: Path, ck: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENREC_DIST_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "--data_dir", str(ev), "--model_dir", str(ck), "--result_dir", str(out),
                           "--query_batch_size", "8", "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def _fresh(world, tmp_path: Path, name: str) -> Path:
    ev = tmp_path / name
    shutil.copytree(world[1], ev)
    return ev


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_and_make_the_ids_once(world, checkpoint, tmp_path):
    want = _single(_fresh(world, tmp_path, "ev1"), checkpoint, tmp_path / "r1")
    ev = _fresh(world, tmp_path, "ev2")
    r = _torchrun(tmp_path, ev, checkpoint, tmp_path / "r2")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "r2" / "result.json").read_text())
    assert got["user"] == want["user"] and got["top10s"] == want["top10s"]
    rep = json.loads((tmp_path / "r2" / "infer_report.json").read_text())
    assert rep["world_size"] == 2 and [x["rank"] for x in rep["ranks"]] == [0, 1]
    assert all(x["users"] > 0 and x["candidates_embedded"] > 0 for x in rep["ranks"])  # both ranks did work
    assert sum(x["users"] for x in rep["ranks"]) == len(want["user"])
    assert [x["semantic_id_bootstrap"] for x in rep["ranks"]] == ["encoded", "loaded"]  # made once, by rank 0
    assert [x["semantic_id_status"] for x in rep["ranks"]] == ["encoded", "encoded"]  # one status for the run
    assert rep["ranks"][0]["semantic_ids_served"] == rep["ranks"][1]["semantic_ids_served"] > 0
    assert rep["semantic_id"]["status"] == "encoded"
    assert r.stderr.count("no semantic_id found, trying to generate") == 1


@pytest.mark.slow
def test_torchrun_ranks_degrade_together_when_ids_cannot_be_made(world, checkpoint, tmp_path):
    ev = _fresh(world, tmp_path, "ev")
    shutil.rmtree(ev / "creative_emb")
    r = _torchrun(tmp_path, ev, checkpoint, tmp_path / "r2")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "r2" / "infer_report.json").read_text())
    assert rep["semantic_id"]["status"] == "failed"
    assert [x["semantic_id_status"] for x in rep["ranks"]] == ["failed", "failed"]  # degraded the same way ...
    assert rep["ranks"][0]["semantic_ids_served"] == rep["ranks"][1]["semantic_ids_served"] > 0  # ... trained IDs
    ev1 = _fresh(world, tmp_path, "ev3")
    shutil.rmtree(ev1 / "creative_emb")
    alone = _single(ev1, checkpoint, tmp_path / "r3")
    assert json.loads((tmp_path / "r2" / "result.json").read_text())["top10s"] == alone["top10s"]


@pytest.mark.slow
def test_torchrun_hybrid_retrieval_equals_one_process(world, gen_checkpoint, tmp_path):
    """Each rank beams for its own users over the whole pool's IDs; the gathered top-10s are one process's."""
    hybrid = ("--retrieval", "hybrid", "--beam_width", "8")
    want = _single(_fresh(world, tmp_path, "ev1"), gen_checkpoint, tmp_path / "r1", *hybrid)
    r = _torchrun(tmp_path, _fresh(world, tmp_path, "ev2"), gen_checkpoint, tmp_path / "r2", *hybrid)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "r2" / "result.json").read_text())
    assert got["user"] == want["user"] and got["top10s"] == want["top10s"]
    rep = json.loads((tmp_path / "r2" / "infer_report.json").read_text())
    assert rep["retrieval"]["backend"] == "hybrid" and rep["retrieval"]["invalid_ids"] == 0
    assert all(x["users"] > 0 for x in rep["ranks"])


@pytest.mark.parametrize("retrieval", ["torch", "hybrid"])
def test_shards_and_merge_equal_one_run(world, checkpoint, gen_checkpoint, tmp_path, capsys, retrieval):
    from evalu.infer import main
    from evalu.shard import main as merge_main

    if retrieval == "hybrid":
        checkpoint = gen_checkpoint
    want = _single(_fresh(world, tmp_path, "ev1"), checkpoint, tmp_path / "r1", "--retrieval", retrieval)
    ev = _fresh(world, tmp_path, "ev2")
    out = tmp_path / "r2"
    for i in (2, 0, 1):  # any order, any machine
        assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(out),
                     "--query_batch_size", "8", "--num_shards", "3", "--shard_id", str(i),
                     "--retrieval", retrieval]) == 0
    assert not (out / "result.json").exists()
    parts = [json.loads((out / f"result.shard-{i:04d}-of-0003.json").read_text()) for i in range(3)]
    assert all(p["user"] for p in parts)  # every shard got users
    assert merge_main(["--result-dir", str(out)]) == 0
    got = json.loads((out / "result.json").read_text())
    assert got["user"] == want["user"] and got["top10s"] == want["top10s"]


def test_merge_refuses_missing_or_foreign_shards(tmp_path):
    from evalu.shard import merge_shards, shard_file

    def part(i, k, start, users, total=4, run="r1"):
        (tmp_path / shard_file(i, k)).write_text(json.dumps({"shard_id": i, "num_shards": k, "user_start": start,
                                                             "users_total": total, "time": 1.0, "user": users,
                                                             "top10s": [[1] * 10 for _ in users], "run": run}))

    part(0, 2, 0, ["a", "b"])
    with pytest.raises(DataFormatError, match=r"missing shard\(s\) \[1\] of 2"):
        merge_shards(tmp_path)
    part(1, 3, 2, ["c", "d"])
    with pytest.raises(DataFormatError, match="different runs"):
        merge_shards(tmp_path)
    (tmp_path / shard_file(1, 3)).unlink()
    part(1, 2, 1, ["c", "d"])  # overlaps shard 0
    with pytest.raises(DataFormatError, match="overlapping or repeated"):
        merge_shards(tmp_path)
    part(1, 2, 2, ["c", "d"], run="r2")  # another checkpoint, other data or other settings
    with pytest.raises(DataFormatError, match="different runs"):
        merge_shards(tmp_path)
    part(1, 2, 2, ["a", "d"])  # a user again
    with pytest.raises(DataFormatError, match="more than one place"):
        merge_shards(tmp_path)
    part(1, 2, 2, ["c", None])
    with pytest.raises(DataFormatError, match="not a list of user ids"):
        merge_shards(tmp_path)
    part(1, 2, 2, ["c", "d"], run=None)
    part(0, 2, 0, ["a", "b"], run=None)
    with pytest.raises(DataFormatError, match="without a run fingerprint"):
        merge_shards(tmp_path)
    part(0, 2, 0, ["a", "b"])
    part(1, 2, 2, ["c", "d"])
    assert json.loads(merge_shards(tmp_path).read_text())["user"] == ["a", "b", "c", "d"]


def test_the_run_fingerprint_changes_with_every_setting_that_changes_answers(checkpoint):
    from dataclasses import replace

    from evalu.infer import InferConfig
    from evalu.shard import run_fingerprint

    cfg = InferConfig(num_shards=3, retrieval="hybrid")
    fp = run_fingerprint(checkpoint, ["a", "b"], cfg)
    assert run_fingerprint(checkpoint, ["a", "b"], replace(cfg, shard_id=2, result_dir="/x", device="cpu")) == fp
    for change in ({"beam_width": 64}, {"retrieval": "torch"}, {"filter_seen": True}, {"score_dtype": "float32"},
                   {"query_batch_size": 7}, {"mm_emb_id": ["82"]}):
        assert run_fingerprint(checkpoint, ["a", "b"], replace(cfg, **change)) != fp, change
    assert run_fingerprint(checkpoint, ["b", "a"], cfg) != fp


def test_shards_split_users_evenly_and_answer_as_one_process(world, checkpoint, tmp_path):
    """40 users in 3 shards with 16-user query batches: 13/13/14 users, the merge equals one process."""
    from evalu.infer import InferConfig, run
    from evalu.shard import merge_shards, shard_file

    _, ev = world
    base = dict(data_dir=str(ev), model_dir=str(checkpoint), query_batch_size=16)
    top, users, _ = run(InferConfig(**base, result_dir=str(tmp_path / "one")))
    sizes = []
    for i in range(3):
        t, u, rep = run(InferConfig(**base, result_dir=str(tmp_path / "sh"), num_shards=3, shard_id=i))
        sizes.append(len(u))
        (tmp_path / "sh" / shard_file(i, 3)).write_text(json.dumps({"top10s": t, "user": u, "time": 1, **rep["shard"]}))
    assert sizes == [13, 13, 14]
    merged = json.loads(merge_shards(tmp_path / "sh").read_text())
    assert merged["user"] == users and merged["top10s"] == top


def test_shard_flags_are_checked(world, checkpoint, tmp_path):
    from evalu.infer import main

    _, ev = world
    base = ["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r")]
    assert main(base + ["--num_shards", "2", "--shard_id", "2"]) == 2
    assert main(base + ["--num_shards", "0"]) == 2


FIT = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np, torch
from rqvae import RQVAEConfig, fit
from genrec.core import dist
dist.init_from_env(torch.device("cpu"))
x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
model, rep = fit(x, RQVAEConfig(num_epochs=3, codebook_size=32, hidden_dims=(16,), latent_dim=8, kmeans_iters=4,
                                batch_size=256, device="cpu"), data_parallel=True)
open({out!r} + f"/rank{{dist.rank()}}.json", "w").write(json.dumps({{"fp": model.fingerprint(), "world": rep["world_size"]}}))
dist.close()
"""


def _torchrun_script(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENREC_DIST_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


@pytest.mark.slow
def test_data_parallel_rqvae_ranks_end_with_the_same_codebooks(tmp_path):
    r = _torchrun_script(tmp_path, FIT.format(root=str(ROOT), out=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["fp"] == ranks[1]["fp"] and ranks[0]["world"] == 2  # weights, codebooks, EMA state: all equal


@pytest.mark.slow
def test_torchrun_train_rqvae_and_train_write_once(world, tmp_path):
    tr, ev = world
    launch = "import sys\nsys.path.insert(0, {root!r})\nimport {mod}\nsys.exit({mod}.main(sys.argv[1:]))\n"
    r = _torchrun_script(tmp_path, launch.format(root=str(ROOT), mod="train_rqvae"),
                         "--data_dir", str(tr), "--output_dir", str(tmp_path / "rq"), "--num_epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("semantic IDs for") == 1  # one writer, one summary
    rep = json.loads((tmp_path / "rq" / "semantic_id_report.json").read_text())
    assert rep["world_size"] == 2 and rep["fit"]["world_size"] == 2
    train_src = tmp_path / "train_copy"
    shutil.copytree(tr, train_src)
    r = _torchrun_script(tmp_path, launch.format(root=str(ROOT), mod="train"),
                         "--data_dir", str(train_src), "--output_dir", str(tmp_path / "ck"),
                         "--epochs", "1", "--hidden", "16", "--maxlen", "20", "--num_negatives", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["train"]["world_size"] == 2 and cfg["train"]["replicas_identical"] is True
    users = cfg["train"]["history"][0]["unfiltered"]["users"]
    from dataset import TrainDataset

    assert users == len(TrainDataset(train_src, maxlen=20).validation_samples()["target"])  # every rank's share
    from evalu.infer import main

    assert main(["--data_dir", str(ev), "--model_dir", str(tmp_path / "ck"), "--result_dir", str(tmp_path / "r")]) == 0


@pytest.mark.slow
def test_torchrun_a_failure_on_one_rank_stops_all_with_one_line_each(world, checkpoint, tmp_path):
    ev = _fresh(world, tmp_path, "ev")
    script = tmp_path / "launch1.py"
    script.write_text(LAUNCH.format(root=str(ROOT)).replace("from evalu.infer import main", """import os
import evalu.infer as inf
if os.environ["RANK"] == "1":  # only rank 1 cannot read its data
    def broken(*a, **k):
        raise FileNotFoundError("rank 1 lost its disk")
    inf.TestDataset = broken
from evalu.infer import main"""))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENREC_DIST_TIMEOUT": "60"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), "--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir",
                        str(tmp_path / "r"), "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    # one error line per rank (the two processes share stderr, so lines may interleave)
    assert r.stderr.count("ERROR cli: ") == 2, r.stderr[-3000:]
    assert "ERROR cli: rank 1 lost its disk" in r.stderr
    assert "ERROR cli: rank(s) [1] failed during loading; all ranks stop" in r.stderr
    assert not (tmp_path / "r").exists()


def test_the_run_report_sums_the_ranks_retrieval_counts():
    """Under torchrun infer_report.json's `retrieval` is the run's: per-user counts summed or averaged over the
    users; counts of the candidates (which every rank holds) are not multiplied by the ranks."""
    from evalu.infer import _whole_run

    ranks = [{"users": 3, "retrieval": {"backend": "hybrid", "invalid_ids": 1, "candidates_scored_per_user": 10.0,
                                        "nonfinite_candidate_vectors": 2}},
             {"users": 1, "retrieval": {"backend": "hybrid", "invalid_ids": 2, "candidates_scored_per_user": 2.0,
                                        "nonfinite_candidate_vectors": 2, "nonfinite_queries": 1}}]
    assert _whole_run(ranks) == {"backend": "hybrid", "invalid_ids": 3, "candidates_scored_per_user": 8.0,
                                 "nonfinite_candidate_vectors": 2, "nonfinite_queries": 1}
