"""Benchmark: generative retrieval on the demo world (final round). Per seed, one model trained with the
generative head (`--generative_head true`) serves the same test users three ways: `torch` (the exact dense
top-10), `generative` (the items behind the head's beam over the pool's semantic IDs) and `hybrid` (those plus
the items without an ID, ranked by the dense score); beside them the default model without the head (dense), to
show what training the head costs the dense ranking. HR@10 / NDCG@10 / score overall, cold and warm, the
retrieval stage's seconds, and how much of the exact dense top-10 hybrid recovers.

    python bench/generative.py [--seeds 0 1 2 --epochs 6 --beam_width 64 --threads 1]
    python bench/generative.py --world ml100k-actions --epochs 20 [--data_root DIR]   # ml100k extra
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evalu.infer import InferConfig, run  # noqa: E402
from genrec.core.cli import FlagParser  # noqa: E402
from genrec.recommender.recommender import ModelConfig  # noqa: E402
from genrec.recommender.trainer import TrainConfig, train  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from harness import (METRIC_COLUMNS, Report, add_run_args, demo_world, fresh_copy, mean_std, ml100k_cold,  # noqa: E402
                     start)

SERVING = ("torch", "generative", "hybrid")
# As bench/ablation.py trains on each world (the demo's IDs see the 1024-d feature the model does not)
WORLD_TRAIN = {"demo": {"sid_mm_emb_id": ["81", "82"]}, "ml100k-actions": {"batch_size": 64, "lr": 2e-3}}


def main(argv: list[str] | None = None) -> dict:
    p = FlagParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--test_users", type=int, default=2000)
    p.add_argument("--beam_width", type=int, default=64)
    p.add_argument("--world", default="demo", choices=["demo", "ml100k-actions"],
                   help="the demo world (final round), or MovieLens-100k with ratings as actions")
    p.add_argument("--data_root", help="ml100k: splits already converted here")
    add_run_args(p)
    a = p.parse_args(argv)
    work = start(a, "generative")
    say = Report()
    runs: dict[str, list[dict]] = {}
    for seed in a.seeds:
        if a.world == "demo":
            train_src, eval_src = demo_world(work, seed, a.test_users, final_round=True)
        else:
            train_src = eval_src = ml100k_cold(work / "worlds", seed, 0.1, a.data_root, ratings_as_actions=True)
        tops = {}
        for head in (False, True):
            # Each model its own copy of the data: IDs one model's inference writes never meet the other model
            train_dir = fresh_copy(train_src, work / f"run{seed}_{head}" / "train")
            eval_dir = train_dir if eval_src == train_src else fresh_copy(eval_src, work / f"run{seed}_{head}" / "eval")
            ck = train(TrainConfig(data_dir=str(train_dir), output_dir=str(work / f"ck{seed}_{head}"), seed=seed,
                                   epochs=a.epochs, device="cpu", model=ModelConfig(generative_head=head),
                                   **WORLD_TRAIN[a.world]))
            for serving in (SERVING if head else ("torch",)):
                name = f"{'head' if head else 'no head'}, {serving}"
                top, users, rep = run(InferConfig(
                    data_dir=str(eval_dir), model_dir=str(ck), result_dir=str(work / f"res{seed}_{head}"),
                    labels=str(eval_dir / "labels.jsonl"), retrieval=serving, beam_width=a.beam_width, device="cpu"))
                tops[name] = top
                m = {**rep["metrics"], "seconds": rep["seconds"]["retrieve"], "retrieval": rep["retrieval"]}
                if serving != "torch":
                    dense = tops["head, torch"]
                    m["recall_of_dense_top10"] = float(np.mean([len(set(t) & set(d)) / max(len(d), 1)
                                                                for t, d in zip(top, dense)]))
                runs.setdefault(name, []).append(m)
                say(f"seed {seed} {name}: score {m['overall']['score']:.4f}, cold HR@10 "
                    f"{m['cold_start']['hr@10']:.4f}, retrieve {m['seconds']:.2f} s")
    world = f"Demo world (final round), {a.test_users} test users" if a.world == "demo" else \
        "MovieLens-100k, ratings as actions (cold-start split, 10% of the films new)"
    say(f"\n{world}, {a.epochs} epochs, seeds {a.seeds}, mean ± std; beam width {a.beam_width}; "
        f"{a.threads or 'torch default'} thread(s)\n")
    say("| model, serving | " + " | ".join(f"{part} {k}" for part, k in METRIC_COLUMNS)
        + " | retrieve s | recall of the dense top-10 | invalid IDs |")
    say("|---|" + "---|" * (len(METRIC_COLUMNS) + 3))
    for name, rs in runs.items():
        say(f"| {name} | " + " | ".join(mean_std(r[part][k] for r in rs) for part, k in METRIC_COLUMNS)
            + f" | {mean_std((r['seconds'] for r in rs), 2)} | "
            + (mean_std(r["recall_of_dense_top10"] for r in rs) if "recall_of_dense_top10" in rs[0] else "-")
            + f" | {sum(r['retrieval'].get('invalid_ids', 0) for r in rs)} |")
    say.write(f"generative-{a.world}", f"Generative retrieval: {world}")
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=1))
    return runs


if __name__ == "__main__":
    main()
