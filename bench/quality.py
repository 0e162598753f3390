"""Benchmark: does the semantic ID help? The same model with and without semantic IDs on the demo world, several
seeds; HR@10 / NDCG@10 / score overall, on cold-start targets (items never seen in training) and on warm ones,
under the history rule each model's validation chose. Both models see the cheap 32-d feature 81 directly; the
semantic IDs come from 81 and the 1024-d feature 82, which the model could not afford to ingest for millions of
items. Also times the first (bootstrap) and second inference run of the ID model, and checks the targets:
cold-start HR@10 with IDs above without by more than one std, overall score not lower.

Ceiling runs change what item content tells (`--topic-share 1`: feature 100 names every item's topic;
`--tier-noise 0`: features 114 / 115 are the exact quality / propensity tiers; `--popularity-feature`: feature
112 is the popularity decile), to measure what content could ever give cold items. The world is the final
round's (exposures, clicks, conversions; the next click or conversion scored, a conversion weighing 2.5). The
table goes to bench/results/quality.md (a ceiling run: quality-<what changed>.md).

    python bench/quality.py [--seeds 0 1 2 --epochs 6 --test_users 2000 --cold_frac 0.2 --threads 1]
    python bench/quality.py --models without --topic-share 1 --tier-noise 0 [--popularity-feature]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads its defaults from the env then
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genrec.core.cli import FlagParser, add_bool, fraction  # noqa: E402
from dataset.synth import SynthConfig  # noqa: E402
sys.path.append(str(Path(__file__).resolve().parent))
from evalu.infer import InferConfig, run  # noqa: E402
from harness import (add_run_args, demo_world, fresh_copy, metric_cells, start, train_and_infer,  # noqa: E402
                     world_changes, write_results)

MODELS = {"no semantic ID": False, "with semantic ID": True}
MODEL_FLAGS = {"without": "no semantic ID", "with": "with semantic ID"}


def main(argv: list[str] | None = None) -> dict:
    p = FlagParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--test_users", type=int, default=2000)
    p.add_argument("--cold_frac", type=float, default=0.2)
    p.add_argument("--sid_features", nargs="+", default=["81", "82"], help="features the RQ-VAE merges")
    p.add_argument("--models", nargs="+", choices=list(MODEL_FLAGS), default=list(MODEL_FLAGS),
                   help="which models to run: without and/or with semantic IDs")
    d = SynthConfig()
    p.add_argument("--topic_share", type=fraction, default=d.topic_share,
                   help="demo world: share of items whose feature 100 is their topic (0-1)")
    p.add_argument("--tier_noise", type=float, default=d.tier_noise,
                   help="demo world: noise of the quality / propensity tiers (features 114 / 115; 0: exact, an oracle)")
    add_bool(p, "popularity_feature", False,
             "demo world: feature 112 is the item's popularity decile (an oracle for ceiling runs)")
    add_run_args(p)
    a = p.parse_args(argv)
    world = {"topic_share": a.topic_share, "tier_noise": a.tier_noise, "popularity_feature": bool(a.popularity_feature),
             "final_round": True}
    models = {MODEL_FLAGS[m]: MODELS[MODEL_FLAGS[m]] for m in MODEL_FLAGS if m in a.models}
    work = start(a, "quality")
    res: dict[str, list[dict]] = {name: [] for name in models}
    boot = []
    try:
        for seed in a.seeds:
            train_src, eval_src = demo_world(work / "worlds", seed, a.test_users, a.cold_frac, **world)
            for name, use in models.items():
                tr, ev = fresh_copy(train_src, work / "run" / "train"), fresh_copy(eval_src, work / "run" / "eval")
                r = train_and_infer(tr, ev, work / "run", seed, ["chosen"], {"use_semantic_ids": use},
                                    epochs=a.epochs, sid_mm_emb_id=a.sid_features)
                res[name].append({**r["chosen"], "filtered": r["chosen_rule"], "seconds": r["seconds"]})
                if use:  # the first run above made the IDs file: time the bootstrap again, now a load
                    _, _, again = run(InferConfig(data_dir=str(ev), model_dir=str(work / "run" / "ckpt"),
                                                  result_dir=str(work / "run" / "res_chosen")))
                    boot.append((r["boot"]["seconds"], r["boot"]["status"], again["seconds"]["semantic_ids"],
                                 again["semantic_id"]["status"]))
                m = r["chosen"]
                print(f"seed {seed} {name:18s} overall score {m['overall']['score']:.4f} cold HR@10 "
                      f"{m['cold_start']['hr@10']:.4f} warm HR@10 {m['warm']['hr@10']:.4f} "
                      f"(filtered: {r['chosen_rule']}, {r['seconds']:.0f} s)", flush=True)
        changes = {k: v for k, v in world_changes(world).items() if k != "final_round"}
        lines = [f"Demo world, final round (SynthConfig defaults{''.join(f', {k}={v}' for k, v in changes.items())}, "
                 f"{a.test_users} test users, {a.cold_frac:.0%} cold items), seeds {a.seeds}, {a.epochs} epochs; both "
                 f"models see feature 81 (32-d); the IDs come from features {a.sid_features}; tested under the rule "
                 "validation chose; the next click or conversion (a conversion weighs 2.5); mean ± std over seeds", "",
                 "| model | overall HR@10 | overall NDCG@10 | overall score | cold HR@10 | cold NDCG@10 | warm HR@10 "
                 "| warm NDCG@10 | filtered | cold users |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, ms in res.items():
            lines.append(f"| {name} | {metric_cells(ms)} | {int(np.mean([m['cold_start']['users'] for m in ms]))} |")
        if boot:
            lines += ["", "| run | semantic-ID stage seconds (first run) | status | second run seconds | status |",
                      "|---|---|---|---|---|"]
            lines += [f"| seed {seed} | {s1:.3f} | {st1} | {s2:.3f} | {st2} |" for seed, (s1, st1, s2, st2) in zip(a.seeds, boot)]
        checks = _checks(res)
        lines += ["", "Targets:", *(f"- {c}" for c in checks)]
        print("\n" + "\n".join(lines))
        name = "quality" + "".join(f"-{k}{v}" for k, v in sorted(changes.items()))
        print(f"wrote {write_results(name, 'Semantic IDs on the demo world', lines)}")
        report = {"results": res, "bootstrap": boot, "checks": checks}
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def _checks(res: dict[str, list[dict]]) -> list[str]:
    if len(res) < 2:
        return ["none checked: the targets compare both models (--models without with)"]
    w, wo = res["with semantic ID"], res["no semantic ID"]
    cw, cwo = (np.array([m["cold_start"]["hr@10"] for m in x]) for x in (w, wo))
    sw, swo = (np.array([m["overall"]["score"] for m in x]) for x in (w, wo))
    need = max(cw.std(), cwo.std())
    return [f"cold-start HR@10: with IDs {cw.mean():.4f} vs without {cwo.mean():.4f}: margin "
            f"{cw.mean() - cwo.mean():+.4f}, larger std {need:.4f} -> {'MET' if cw.mean() - cwo.mean() > need else 'MISSED'}",
            f"overall score: with IDs {sw.mean():.4f} vs without {swo.mean():.4f} -> "
            f"{'MET' if sw.mean() >= swo.mean() else 'MISSED'}"]


if __name__ == "__main__":
    main()
