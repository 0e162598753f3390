"""Ablation: what each modelling choice is worth, one change at a time against the defaults, on the demo world and
the MovieLens-100k cold-start split (3 seeds by default).

Every run trains on a fresh copy (its own semantic IDs), validates with history filtering chosen automatically
(train.py --filter_seen auto) and is tested under the rule validation chose; HR@10 / NDCG@10 overall, on
cold-start targets (items never seen in training) and on warm ones; mean ± std over seeds.

    python bench/ablation.py --world demo|ml100k [--seeds 0 1 2] [--variants NAME ...] [--data-root DIR]
    python bench/ablation.py --merge A.json B.json   # one table over runs split across processes (their --out)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads its defaults from the env then
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset.cli import FlagParser  # noqa: E402
sys.path.append(str(Path(__file__).resolve().parent))
from harness import add_run_args, demo_world, fresh_copy, mean_std, metric_cells, ml100k_cold, start, train_and_infer  # noqa: E402

# name -> (ModelConfig overrides, TrainConfig overrides)
VARIANTS = {
    "defaults": ({}, {}),
    "no semantic IDs": ({"use_semantic_ids": False}, {}),
    "no item bias": ({"item_bias": False}, {}),
    "no learnt history offset": ({"history_bias": False}, {}),
    "per-level ID tables (not prefixes)": ({"sid_embedding": "level"}, {}),
    "512 sampled negatives + in-batch, logQ": ({"num_negatives": 512}, {}),
    "512 sampled negatives + in-batch, no logQ": ({"num_negatives": 512, "logq": False}, {}),
    "IDs by rqkmeans": ({}, {"sid_method": "rqkmeans"}),
    "no history filtering": ({}, {"filter_seen": "false"}),
    "always history filtering": ({}, {"filter_seen": "true"}),
    "first version": ({"num_negatives": 512, "logq": False, "sid_embedding": "level", "item_bias": False,
                       "history_bias": False}, {"sid_method": "rqvae", "filter_seen": "false", "random_window": False}),
}
WORLDS = {"demo": {"epochs": 6, "sid_mm_emb_id": ["81", "82"]},  # the IDs see the 1024-d feature the model does not
          "ml100k": {"epochs": 60, "batch_size": 64, "lr": 2e-3}}


def main(argv: list[str] | None = None) -> dict:
    p = FlagParser(description=__doc__)
    p.add_argument("--world", choices=list(WORLDS), help="required unless --merge")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, help="default: 6 (demo), 60 (ml100k)")
    p.add_argument("--test-users", type=int, default=2000, help="demo world")
    p.add_argument("--cold-frac", type=float, default=None, help="default: 0.2 (demo), 0.1 (ml100k)")
    p.add_argument("--data-root", help="ml100k: converted splits (cold{seed}/) instead of converting")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="print one table over these --out files (same world and training settings), seeds in order")
    add_run_args(p)
    a = p.parse_args(argv)
    if a.merge:
        return _merge(a.merge, p)
    if a.world is None:
        p.error("the following arguments are required: --world (or --merge)")
    work = start(a, "ablation")
    kw = dict(WORLDS[a.world], **({"epochs": a.epochs} if a.epochs else {}))
    res: dict[str, list[dict]] = {}
    try:
        for seed in a.seeds:
            if a.world == "demo":
                train_src, eval_src = demo_world(work / "worlds", seed, a.test_users, a.cold_frac or 0.2)
            else:
                train_src = eval_src = ml100k_cold(work / "worlds", seed, a.cold_frac or 0.1, a.data_root)
            for name in a.variants:
                model, train_kw = VARIANTS[name]
                tr = fresh_copy(train_src, work / "run" / "train")
                ev = tr if eval_src == train_src else fresh_copy(eval_src, work / "run" / "eval")
                r = train_and_infer(tr, ev, work / "run", seed, ["chosen"], model, **{**kw, **train_kw})
                m = r["chosen"]
                res.setdefault(name, []).append({**m, "filtered": r["chosen_rule"], "seconds": r["seconds"]})
                print(f"seed {seed} {name:44s} overall HR@10 {m['overall']['hr@10']:.4f} cold {m['cold_start']['hr@10']:.4f}"
                      f" warm {m['warm']['hr@10']:.4f} (filtered: {r['chosen_rule']}, {r['seconds']:.0f} s)", flush=True)
        report = {"world": a.world, "train": kw, "seeds": a.seeds, "results": res}
        _table(report)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict) -> None:
    """The mean ± std table of a report, and how the semantic IDs move cold-start HR@10 where both arms ran."""
    res = report["results"]
    print(f"\n# {report['world']}: seeds {report['seeds']}, {report['train']}; tested under the rule validation chose; "
          "mean ± std over seeds")
    print("| variant | overall HR@10 | overall NDCG@10 | overall score | cold-start HR@10 | cold-start NDCG@10 | "
          "warm HR@10 | warm NDCG@10 | filtered | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ms in res.items():
        print(f"| {name} | {metric_cells(ms)} | {mean_std((m['seconds'] for m in ms), 0)} |")
    if "defaults" in res and "no semantic IDs" in res:
        for k in ("hr@10", "ndcg@10"):
            w, wo = (np.array([m["cold_start"][k] for m in res[v]]) for v in ("defaults", "no semantic IDs"))
            print(f"- cold-start {k.upper()}: with IDs {w.mean():.4f} ± {w.std():.4f}, without {wo.mean():.4f} ± "
                  f"{wo.std():.4f}: {w.mean() / max(wo.mean(), 1e-12):.2f}x, bands "
                  f"{'apart' if w.mean() - w.std() > wo.mean() + wo.std() else 'overlap'}; per seed "
                  + " / ".join(f"{x:.3f} vs {y:.3f}" for x, y in zip(w, wo)))


def _merge(paths: list[str], p: argparse.ArgumentParser) -> dict:
    """One report over several --out files: their seeds and every variant's runs, concatenated in the given order."""
    merged: dict | None = None
    for path in paths:
        try:
            rep = json.loads(Path(path).read_text())
            setting = (rep["world"], rep["train"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--merge: {path} is no --out file of this bench ({e.__class__.__name__}: {e})")
        if merged is None:
            merged = {"world": rep["world"], "train": rep["train"], "seeds": [], "results": {}}
        elif setting != (merged["world"], merged["train"]):
            p.error(f"--merge: {path} ran {setting}, {paths[0]} {(merged['world'], merged['train'])}: different runs")
        merged["seeds"] += rep["seeds"]
        for name, runs in rep["results"].items():
            merged["results"].setdefault(name, []).extend(runs)
    _table(merged)
    return merged


if __name__ == "__main__":
    main()
