"""Benchmark: does the semantic ID help? The same model with and without semantic IDs on the demo world,
several seeds; HR@10 / NDCG@10 / score overall, on cold-start targets (never seen in training) and on warm ones.
Both models see the cheap 32-d feature 81 directly; the semantic IDs come from 81 and the 1024-d feature 82,
which the model could not afford to ingest for millions of items. Also times the first (bootstrap) and
second inference run of the ID model.

    python bench/quality.py [--seeds 0 1 2 --epochs 6 --test-users 2000 --cold-frac 0.2]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset.synth import SynthConfig, generate  # noqa: E402
from evalu.infer import InferConfig, run  # noqa: E402
from model.recommender import ModelConfig  # noqa: E402
from model.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--test-users", type=int, default=2000)
    p.add_argument("--cold-frac", type=float, default=0.2)
    p.add_argument("--sid-features", nargs="+", default=["81", "82"], help="features the RQ-VAE merges")
    p.add_argument("--keep", help="keep the work dir here")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_quality_"))
    results: dict[str, list[dict]] = {"no semantic ID": [], "with semantic ID": []}
    boot = []
    try:
        for seed in a.seeds:
            world = work / f"world{seed}"
            generate(world / "train", SynthConfig(seed=seed, test_users=a.test_users, cold_frac=a.cold_frac),
                     eval_out=world / "eval")
            for name, use in (("no semantic ID", False), ("with semantic ID", True)):
                ck = world / ("ckpt_sid" if use else "ckpt_plain")
                train(TrainConfig(data_dir=str(world / "train"), output_dir=str(ck), epochs=a.epochs, seed=seed,
                                  sid_mm_emb_id=a.sid_features, model=ModelConfig(use_semantic_ids=use)))
                cfg = InferConfig(data_dir=str(world / "eval"), model_dir=str(ck), result_dir=str(world / f"res_{use}"),
                                  labels=str(world / "eval" / "labels.jsonl"))
                _, _, rep = run(cfg)
                results[name].append(rep["metrics"])
                if use:
                    _, _, rep2 = run(cfg)
                    boot.append((rep["seconds"]["semantic_ids"], rep["semantic_id"]["status"],
                                 rep2["seconds"]["semantic_ids"], rep2["semantic_id"]["status"]))
        print(f"# demo world (SynthConfig defaults, {a.test_users} test users, {a.cold_frac:.0%} cold items), seeds "
              f"{a.seeds}, {a.epochs} epochs; both models see feature 81 (32-d); the IDs come from features "
              f"{a.sid_features}; mean ± std over seeds")
        print("| model | overall HR@10 | overall NDCG@10 | overall score | cold HR@10 | cold NDCG@10 | warm HR@10 | cold users |")
        print("|---|---|---|---|---|---|---|---|")
        for name, ms in results.items():
            def f(part: str, key: str) -> str:
                v = np.array([m[part][key] for m in ms])
                return f"{v.mean():.4f} ± {v.std():.4f}"
            print(f"| {name} | {f('overall', 'hr@10')} | {f('overall', 'ndcg@10')} | {f('overall', 'score')} | "
                  f"{f('cold_start', 'hr@10')} | {f('cold_start', 'ndcg@10')} | {f('warm', 'hr@10')} | "
                  f"{int(np.mean([m['cold_start']['users'] for m in ms]))} |")
        print("\n| run | semantic-ID stage seconds (first run) | status | second run seconds | status |")
        print("|---|---|---|---|---|")
        for seed, (s1, st1, s2, st2) in zip(a.seeds, boot):
            print(f"| seed {seed} | {s1:.3f} | {st1} | {s2:.3f} | {st2} |")
        (work / "quality.json").write_text(json.dumps({"results": results, "bootstrap": boot}))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
