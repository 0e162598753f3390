"""Smoke tests of the quality benchmarks' plumbing (tiny runs; the figures themselves are the benchmarks' job)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_path(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", sys.path + [str(BENCH)])
    monkeypatch.setenv("GENREC_BENCH_RESULTS", str(tmp_path / "results"))  # never the repository's results


def test_quality_bench_reports_both_models_and_the_targets(bench_path, tmp_path, capsys):
    import quality

    rep = quality.main(["--seeds", "0", "--epochs", "1", "--test-users", "60", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("no semantic ID", "with semantic ID"):
        (m,) = rep["results"][name]
        assert isinstance(m["filtered"], bool) and {"overall", "cold_start", "warm"} <= set(m)
        assert m["overall"]["users"] == 60
    (boot,) = rep["bootstrap"]
    assert boot[1] in ("encoded", "loaded", "loaded+encoded") and boot[3] == "loaded"  # second run loads the file
    assert "cold-start HR@10: with IDs" in out and "overall score: with IDs" in out


def test_quality_bench_runs_one_model_on_a_ceiling_world(bench_path, tmp_path, capsys):
    import quality

    rep = quality.main(["--seeds", "0", "--epochs", "1", "--test-users", "60", "--models", "without",
                        "--topic-share", "1", "--popularity-feature", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert list(rep["results"]) == ["no semantic ID"] and rep["bootstrap"] == []
    assert rep["checks"] == ["none checked: the targets compare both models (--models without with)"]
    assert "topic_share=1.0, popularity_feature=True" in out
    (world,) = (tmp_path / "worlds").iterdir()  # the ceiling world has a directory of its own
    assert world.name == "demo0_final_roundTrue_popularity_featureTrue_topic_share1.0"


def test_ablation_merge_concatenates_seeds_and_refuses_other_settings(bench_path, tmp_path, capsys):
    import ablation

    def run_file(name: str, seeds: list[int], cold: dict[str, list[float]], epochs: int = 60) -> str:
        part = lambda hr: {"users": 80, "hr@10": hr, "ndcg@10": hr / 2, "score": hr}  # noqa: E731
        res = {v: [{"overall": part(0.2), "cold_start": part(c), "warm": part(0.2), "filtered": True, "seconds": 9.0}
                   for c in hrs] for v, hrs in cold.items()}
        path = tmp_path / name
        path.write_text(json.dumps({"world": "ml100k", "train": {"epochs": epochs}, "seeds": seeds, "results": res}))
        return str(path)

    a = run_file("a.json", [0, 1], {"defaults": [0.10, 0.08], "no semantic IDs": [0.02, 0.04]})
    b = run_file("b.json", [3], {"defaults": [0.06], "no semantic IDs": [0.03]})
    rep = ablation.main(["--merge", a, b])
    out = capsys.readouterr().out
    assert rep["seeds"] == [0, 1, 3] and len(rep["results"]["defaults"]) == 3
    assert "| defaults | 0.2000 ± 0.0000 |" in out
    assert ("- cold-start HR@10, semantic IDs vs none: 0.0800 ± 0.0163 vs 0.0300 ± 0.0082 = 2.67x (per seed "
            "0.1000 vs 0.0200 / 0.0800 vs 0.0400 / 0.0600 vs 0.0300)") in out
    written = (tmp_path / "results" / "ablation-ml100k.md").read_text()  # the merged table is the results file
    assert "| defaults | 0.2000 ± 0.0000 |" in written and "Machine: " in written and "Command: `" in written
    with pytest.raises(SystemExit) as stop:  # other training settings: never one table
        ablation.main(["--merge", a, run_file("c.json", [4], {"defaults": [0.1]}, epochs=120)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "different runs" in err
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as stop:
        ablation.main(["--merge", a, str(tmp_path / "bad.json")])
    assert stop.value.code == 2 and "is no --out file of this bench" in capsys.readouterr().err


def test_ml100k_merge_concatenates_seeds(bench_path, tmp_path, capsys):
    import ml100k

    def run_file(seed: int, hr: float) -> Path:
        m = {"users": 90, "hr@10": hr, "ndcg@10": hr / 2, "score": hr, "seconds": 1.0}
        ours = {}
        for name in ("ours, no semantic ID", "ours, semantic IDs"):
            v = hr if name.endswith("IDs") else hr / 2
            for rule in ("unfiltered", "filtered"):
                ours[f"warm | {name} | {rule}"] = [{**m, "hr@10": v, "ndcg@10": v / 2}]
                ours[f"cold-start | {name} | {rule}"] = [{**m, "hr@10": v, "ndcg@10": v / 2}]
            ours[f"cold-start | {name} | chosen"] = [{"filtered": True}]
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps({"peers": [], "ours": ours, "seeds": [seed]}))
        return p

    rep = ml100k.main(["--merge", str(run_file(0, 0.10)), str(run_file(1, 0.12))])
    out = capsys.readouterr().out
    assert "seeds [0, 1]" in out
    cold = [c for c in rep["checks"] if c.startswith("cold-start filtered hr@10")]
    assert cold and "0.1100 ± 0.0100" in cold[0] and "2.00x" in cold[0]
    # paired by seed (the files carry their seeds): differences 0.05 and 0.06
    assert "paired by seed: difference +0.0550 ± 0.0050, with IDs higher in 2, lower in 0 of 2 seeds" in cold[0]
    other = tmp_path / "none.json"  # runs of the model that sees the text only through the IDs: never merged with these
    other.write_text(json.dumps({**json.loads(run_file(2, 0.1).read_text()), "model_text": "none"}))
    with pytest.raises(SystemExit) as stop:  # a usage error: one line, exit 2, as every CLI of the project
        ml100k.main(["--merge", str(run_file(0, 0.10)), str(other)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "runs of different models" in err


@pytest.mark.slow
def test_scale_bench_splits_over_two_processes_with_the_same_top10(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--candidates", "140000", "--users", "1100",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(rows) == 2 and all(ln.rstrip().endswith("| yes |") for ln in rows), r.stdout
    written = Path(os.environ["GENREC_BENCH_RESULTS"]) / "scale.md"  # a test never writes bench/results/
    assert written.is_file() and "140000" in written.read_text()
    assert "--work" not in (BENCH / "results" / "scale.md").read_text()


def test_generative_bench_serves_one_model_three_ways(bench_path, tmp_path):
    import generative

    runs = generative.main(["--seeds", "0", "--epochs", "1", "--test_users", "60", "--beam_width", "8",
                            "--curve", "3000", "--curve_users", "20", "--keep", str(tmp_path)])
    assert set(runs) == {"no head, torch", "head, torch", "head, generative (beam 8)", "head, hybrid (beam 8)",
                         "curve"}
    assert all(r["retrieval"]["invalid_ids"] == 0 for r in runs["head, hybrid (beam 8)"])
    assert 0 <= runs["head, hybrid (beam 8)"][0]["recall_of_dense_top10"] <= 1
    curve = runs["curve"]  # exact dense, then hybrid at both cold shares (0 and the world's)
    assert [r["serving"] for r in curve] == ["dense", "hybrid (beam 8)", "hybrid (beam 8)"]
    assert curve[1]["cold_share"] == 0 and curve[1]["scored_per_user"] <= 8 < curve[2]["scored_per_user"]
    assert (Path(os.environ["GENREC_BENCH_RESULTS"]) / "generative-demo.md").is_file()
