"""Benchmark on real data: MovieLens-100k in the competition format, the whole product end to end.

For each seed: convert (warm split, and an item cold-start split where a seeded 10% of items never appear in
training), train.py without and with semantic IDs, evalu/infer.py with full ranking over all items (history
items filtered, as RecBole's full sort does). Reports HR@10, NDCG@10 and the competition score, mean ± std.
Anchor: RecBole's GRU4Rec on ml-100k, leave-one-out by time, full ranking: HR@10 0.1103, NDCG@10 0.0513.

    python bench/ml100k.py [--seeds 0 1 2 --epochs 30]      (needs the ml100k extra)
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset.convert_ml100k import _read_atomic, convert, embed, find_recbole_ml100k  # noqa: E402
from evalu.infer import InferConfig, run  # noqa: E402
from model.recommender import ModelConfig  # noqa: E402
from model.trainer import TrainConfig, train  # noqa: E402

GRU4REC = {"hr@10": 0.1103, "ndcg@10": 0.0513}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--cold-frac", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--data-root", help="use splits already converted here (warm{seed}/, cold{seed}/) instead of "
                                       "converting (a machine without the ml100k extra)")
    p.add_argument("--convert-only", action="store_true", help="write the splits to --keep and stop")
    p.add_argument("--max-users", type=int, default=None, help="first users only (smoke tests)")
    p.add_argument("--keep", help="keep the work dir here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_ml100k_"))
    if a.data_root:
        root = Path(a.data_root)
        splits_of = {s: {"warm": root / f"warm{s}" if (root / f"warm{s}").is_dir() else root / "warm",
                         "cold-start": root / f"cold{s}"} for s in a.seeds}
    else:
        src = find_recbole_ml100k()
        rows = _read_atomic(src / "ml-100k.item")
        emb = embed([f"{r.get('movie_title', '')} ({r.get('release_year', '')}): "
                     f"{', '.join(r.get('class', '').split())}" for r in rows])  # once; every split reuses it
        warm = convert(work / "warm", src, 0.0, 0, emb, a.max_users)  # the warm split does not depend on the seed
        splits_of = {s: {"warm": warm, "cold-start": convert(work / f"cold{s}", src, a.cold_frac, s, emb, a.max_users)}
                     for s in a.seeds}
        if a.convert_only:
            return {}
    res: dict[tuple[str, str], list[dict]] = {}
    try:
        for seed in a.seeds:
            splits = splits_of[seed]
            for split, d in splits.items():
                for name, use in (("no semantic ID", False), ("with semantic ID", True)):
                    ck = work / f"{d.name}_s{seed}_ck_{use}"
                    train(TrainConfig(data_dir=str(d), output_dir=str(ck), epochs=a.epochs, seed=seed,
                                      batch_size=a.batch_size, lr=a.lr, device=a.device, num_workers=a.num_workers,
                                      model=ModelConfig(use_semantic_ids=use)))
                    _, _, rep = run(InferConfig(data_dir=str(d), model_dir=str(ck), result_dir=str(ck / "res"),
                                                labels=str(d / "labels.jsonl"), filter_seen=True, device=a.device))
                    part = "overall" if split == "warm" else "cold_start"
                    res.setdefault((split, name), []).append(rep["metrics"][part])
                    m = rep["metrics"][part]
                    print(f"seed {seed} {split:10s} {name:17s} HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} "
                          f"({m['users']} users)", flush=True)
        import torch
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu"
        print(f"\n# ml-100k on {dev}, leave-one-out by time, full ranking over all 1682 items, seeds {a.seeds}, "
              f"{a.epochs} epochs, batch {a.batch_size}, lr {a.lr}; cold-start: {a.cold_frac:.0%} of items unseen in training, users whose target "
              f"is one of them")
        print("| split | model | HR@10 | NDCG@10 | score | users |")
        print("|---|---|---|---|---|---|")
        for (split, name), ms in res.items():
            def f(key: str) -> str:
                v = np.array([m[key] for m in ms])
                return f"{v.mean():.4f} ± {v.std():.4f}"
            print(f"| {split} | {name} | {f('hr@10')} | {f('ndcg@10')} | {f('score')} | {ms[0]['users']} |")
        print(f"| warm | RecBole GRU4Rec (published) | {GRU4REC['hr@10']:.4f} | {GRU4REC['ndcg@10']:.4f} | "
              f"{0.31 * GRU4REC['hr@10'] + 0.69 * GRU4REC['ndcg@10']:.4f} | 943 |")
        return res
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
