"""Ablation: what each modelling choice is worth, one change at a time against the defaults, on the demo world
(final round: exposures, clicks and conversions), MovieLens-100k with ratings as actions (1-3 stars an exposure,
4 a click, 5 a conversion) and the plain MovieLens-100k cold-start split (3 seeds by default).

Every run trains on a fresh copy (its own semantic IDs), validates with history filtering chosen automatically
(train.py --filter_seen auto) and is tested under the rule validation chose. The metric is the competition's: each
test user's next click or conversion, HR@10 / NDCG@10 / score (0.31 HR + 0.69 NDCG), a conversion weighing 2.5;
overall, on cold-start targets (items never seen in training) and on warm ones; mean ± std over seeds, and each
variant's score against the defaults seed by seed. `--variants actions` runs the action ablation (action-blind,
each action piece alone, all of them, and the defaults without semantic IDs). The table goes to
bench/results/ablation-<world>.md.

    python bench/ablation.py --world demo|ml100k-actions|ml100k [--seeds 0 1 2] [--variants NAME ... | actions]
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
from genrec.core.cli import FlagParser  # noqa: E402
sys.path.append(str(Path(__file__).resolve().parent))
from harness import (add_run_args, demo_world, fresh_copy, mean_std, metric_cells, ml100k_cold, start,  # noqa: E402
                     train_and_infer, write_results)

UNIFORM = "0:1,1:1,2:1"  # every next item a target of weight 1
BLIND = "action-blind (--use_actions false)"
# name -> (ModelConfig overrides, TrainConfig overrides)
VARIANTS = {
    "defaults": ({}, {}),
    BLIND: ({}, {"use_actions": False}),
    "history actions only": ({"action_query": False}, {"target_weights": UNIFORM}),
    "target weights only": ({"action_embedding": False, "action_query": False}, {}),
    "target-action query only": ({"action_embedding": False}, {"target_weights": UNIFORM}),
    "exposure targets weigh 0": ({}, {"target_weights": "0:0,1:1,2:2.5"}),
    "no semantic IDs": ({"use_semantic_ids": False}, {}),
    "no item bias": ({"item_bias": False}, {}),
    "no learnt history offset": ({"history_bias": False}, {}),
    "per-level ID tables (not prefixes)": ({"sid_embedding": "level"}, {}),
    "512 sampled negatives + in-batch, logQ": ({"num_negatives": 512}, {}),
    "512 sampled negatives + in-batch, no logQ": ({"num_negatives": 512, "logq": False}, {}),
    "IDs by rqkmeans": ({}, {"sid_method": "rqkmeans"}),
    "no history filtering": ({}, {"filter_seen": False}),
    "always history filtering": ({}, {"filter_seen": True}),
    "first version": ({"num_negatives": 512, "logq": False, "sid_embedding": "level", "item_bias": False,
                       "history_bias": False}, {"sid_method": "rqvae", "filter_seen": False, "random_window": False}),
}
PRESETS = {"actions": ["defaults", BLIND, "history actions only", "target weights only", "target-action query only",
                       "no semantic IDs"]}
WORLDS = {"demo": {"epochs": 6, "sid_mm_emb_id": ["81", "82"]},  # the IDs see the 1024-d feature the model does not
          "ml100k-actions": {"epochs": 60, "batch_size": 64, "lr": 2e-3},
          "ml100k": {"epochs": 60, "batch_size": 64, "lr": 2e-3}}
# What each world's action ablation must show: (least score ratio of the defaults over action-blind on the mean, in
# every seed), and the least cold-start HR@10 ratio of the semantic IDs in every seed (None: not a target there).
TARGETS = {"demo": (1.15, 1.0, 1.2), "ml100k-actions": (1.0, 1.0, None), "ml100k": (None, None, None)}


def main(argv: list[str] | None = None) -> dict:
    p = FlagParser(description=__doc__)
    p.add_argument("--world", choices=list(WORLDS), help="required unless --merge")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *PRESETS],
                   help="variants to run, or a preset: actions")
    p.add_argument("--epochs", type=int, help="default: 6 (demo), 60 (ml100k)")
    p.add_argument("--test_users", type=int, default=2000, help="demo world")
    p.add_argument("--cold_frac", type=float, default=None, help="default: 0.2 (demo), 0.1 (ml100k)")
    p.add_argument("--data_root", help="ml100k: converted splits (cold{seed}/) instead of converting")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="print one table over these --out files (same world and training settings), seeds in order")
    add_run_args(p)
    a = p.parse_args(argv)
    if a.merge:
        return _merge(a.merge, p)
    if a.world is None:
        p.error("the following arguments are required: --world (or --merge)")
    variants = list(dict.fromkeys(v for name in a.variants for v in PRESETS.get(name, [name])))
    work = start(a, "ablation")
    kw = dict(WORLDS[a.world], **({"epochs": a.epochs} if a.epochs else {}))
    res: dict[str, list[dict]] = {}
    try:
        for seed in a.seeds:
            if a.world == "demo":
                train_src, eval_src = demo_world(work / "worlds", seed, a.test_users, a.cold_frac or 0.2,
                                                 final_round=True)
            else:
                train_src = eval_src = ml100k_cold(work / "worlds", seed, a.cold_frac or 0.1, a.data_root,
                                                   ratings_as_actions=a.world == "ml100k-actions")
            for name in variants:
                model, train_kw = VARIANTS[name]
                tr = fresh_copy(train_src, work / "run" / "train")
                ev = tr if eval_src == train_src else fresh_copy(eval_src, work / "run" / "eval")
                r = train_and_infer(tr, ev, work / "run", seed, ["chosen"], model, **{**kw, **train_kw})
                m = r["chosen"]
                res.setdefault(name, []).append({**m, "filtered": r["chosen_rule"], "seconds": r["seconds"]})
                print(f"seed {seed} {name:44s} overall HR@10 {m['overall']['hr@10']:.4f} cold {m['cold_start']['hr@10']:.4f}"
                      f" warm {m['warm']['hr@10']:.4f} (filtered: {r['chosen_rule']}, {r['seconds']:.0f} s)", flush=True)
        report = {"world": a.world, "train": kw, "seeds": a.seeds, "results": res}
        _table(report, write=True)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict, write: bool = False) -> list[str]:
    """The mean ± std table of a report, each variant's score against the defaults seed by seed, and the checks
    (actions; the semantic IDs on cold-start items) where their arms ran; printed, and with `write` also the
    results file bench/results/ablation-<world>.md."""
    res = report["results"]
    lines = [f"{report['world']}: seeds {report['seeds']}, {report['train']}; tested under the rule validation "
             "chose; the next click or conversion (a conversion weighs 2.5); mean ± std over seeds", "",
             "| variant | overall HR@10 | overall NDCG@10 | overall score | cold-start HR@10 | cold-start NDCG@10 | "
             "warm HR@10 | warm NDCG@10 | filtered | seconds | score / defaults, per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = [m["overall"]["score"] for m in res.get("defaults", [])]
    for name, ms in res.items():
        ratio = " / ".join(f"{m['overall']['score'] / b:.2f}" if b else "-" for m, b in zip(ms, base)) if base else "-"
        lines.append(f"| {name} | {metric_cells(ms)} | {mean_std((m['seconds'] for m in ms), 0)} | {ratio} |")
    lines += ["", *_checks(report["world"], res)]
    print("\n" + "\n".join(lines))
    if write:
        print(f"wrote {write_results('ablation-' + report['world'], 'Ablation: ' + report['world'], lines)}")
    return lines


def _pairs(res: dict, a: str, b: str, part: str, key: str) -> tuple[np.ndarray, np.ndarray, str]:
    x, y = (np.array([m[part][key] for m in res[v]]) for v in (a, b))
    return x, y, " / ".join(f"{p:.4f} vs {q:.4f}" for p, q in zip(x, y))


def _checks(world: str, res: dict) -> list[str]:
    """Each target of TARGETS[world] whose arms ran: the figures, per seed, MET or MISSED."""
    score_mean, score_seed, cold_seed = TARGETS.get(world, (None, None, None))
    out = []
    if "defaults" in res and BLIND in res and score_mean is not None:
        x, y, per = _pairs(res, "defaults", BLIND, "overall", "score")
        r, rs = x.mean() / max(y.mean(), 1e-12), x / np.maximum(y, 1e-12)
        ok = r >= score_mean and (rs > score_seed).all() if score_mean > 1 else r > 1 and (rs >= 1).all()
        want = (f">= {score_mean:.2f}x on the mean, higher in every seed" if score_mean > 1 else
                "above on the mean, not below in any seed")
        out.append(f"- score, action-aware defaults vs action-blind: {x.mean():.4f} vs {y.mean():.4f} = {r:.2f}x "
                   f"(per seed {per}; want {want}): {'MET' if ok else 'MISSED'}")
    if "defaults" in res and "no semantic IDs" in res:
        x, y, per = _pairs(res, "defaults", "no semantic IDs", "cold_start", "hr@10")
        rs = x / np.maximum(y, 1e-12)
        line = (f"- cold-start HR@10, semantic IDs vs none: {x.mean():.4f} ± {x.std():.4f} vs {y.mean():.4f} ± "
                f"{y.std():.4f} = {x.mean() / max(y.mean(), 1e-12):.2f}x (per seed {per})")
        if cold_seed is not None:
            line += f"; want >= {cold_seed}x in every seed: {'MET' if (rs >= cold_seed).all() else 'MISSED'}"
        out.append(line)
        x, y, per = _pairs(res, "defaults", "no semantic IDs", "overall", "score")
        out.append(f"- overall score, semantic IDs vs none: {x.mean():.4f} vs {y.mean():.4f} (per seed {per})")
    return out


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
    _table(merged, write=True)
    return merged


if __name__ == "__main__":
    main()
