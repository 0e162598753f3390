"""Benchmark: generative retrieval. Per seed, one model trained with the generative head
(`--generative_head true`) serves the same test users three ways: `torch` (the exact dense top-10),
`generative` (the items behind the head's beam over the pool's semantic IDs) and `hybrid` (those plus the items
the beam cannot reach: no ID, or never trained on; ranked by the dense score), at each beam width; beside them
the default model without the head (dense), to show what training the head costs the dense ranking.
HR@10 / NDCG@10 / score overall, cold and warm, the retrieval stage's seconds, and how much of the exact dense
top-10 each recovers.

`--curve` adds, in the same run, the retrieval time as the pool grows to the competition's 3.6M candidates: the
first seed's model (its head and queries) over a pool of random unit vectors with random semantic IDs, where a
share of the pool (`--cold_share`, default: the share of the world's pool the beam could not reach) is never
trained on. Exact dense top-10 against hybrid, one thread each, the same users. The pool is random, so this part
times the stages and says nothing of quality.

    python bench/generative.py [--seeds 0 1 2 --epochs 6 --beam_width 64 256 --threads 1]
    python bench/generative.py --world ml100k-actions --epochs 20 [--data_root DIR]   # ml100k extra
    python bench/generative.py --seeds 0 1 2 --curve 100000 400000 1600000 3600000 --threads 1
    python bench/generative.py --items 20000 --users 6000 --threads 1                   # a larger pool
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

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
    p.add_argument("--beam_width", type=int, nargs="+", default=[64, 256])
    p.add_argument("--curve", type=int, nargs="*", default=[], help="pool sizes for the retrieval time curve")
    p.add_argument("--curve_users", type=int, default=1000)
    p.add_argument("--cold_share", type=float, nargs="+",
                   help="curve: shares of the pool never trained on (default: 0 and the world's)")
    p.add_argument("--world", default="demo", choices=["demo", "ml100k-actions"],
                   help="the demo world (final round), or MovieLens-100k with ratings as actions")
    p.add_argument("--data_root", help="ml100k: splits already converted here")
    p.add_argument("--items", type=int, help="demo: items in the world (default: the demo's)")
    p.add_argument("--users", type=int, help="demo: training users (default: the demo's)")
    add_run_args(p)
    a = p.parse_args(argv)
    work = start(a, "generative")
    say = Report()
    runs: dict[str, list[dict]] = {}
    shares: list[float] = []  # per hybrid run: the pool's share the beam cannot reach
    first_ck = None
    for seed in a.seeds:
        if a.world == "demo":
            shape = {k: v for k, v in (("items", a.items), ("users", a.users)) if v}
            train_src, eval_src = demo_world(work, seed, a.test_users, final_round=True, **shape)
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
            servings = [("torch", a.beam_width[0])]
            if head:
                servings += [(sv, w) for w in a.beam_width for sv in SERVING[1:]]
                first_ck = first_ck or ck
            for serving, width in servings:
                beam = f" (beam {width})" if serving != "torch" else ""
                name = f"{'head' if head else 'no head'}, {serving}{beam}"
                top, users, rep = run(InferConfig(
                    data_dir=str(eval_dir), model_dir=str(ck), result_dir=str(work / f"res{seed}_{head}"),
                    labels=str(eval_dir / "labels.jsonl"), retrieval=serving, beam_width=width, device="cpu"))
                tops[name] = top
                m = {**rep["metrics"], "seconds": rep["seconds"]["retrieve"], "retrieval": rep["retrieval"]}
                if serving != "torch":
                    dense = tops["head, torch"]
                    m["recall_of_dense_top10"] = float(np.mean([len(set(t) & set(d)) / max(len(d), 1)
                                                                for t, d in zip(top, dense)]))
                    shares.append(rep["retrieval"]["unreachable_items"] / rep["candidates"])
                runs.setdefault(name, []).append(m)
                say(f"seed {seed} {name}: score {m['overall']['score']:.4f}, cold HR@10 "
                    f"{m['cold_start']['hr@10']:.4f}, retrieve {m['seconds']:.2f} s")
    size = "".join(f", {v} {k}" for k, v in (("items", a.items), ("training users", a.users)) if v)
    world = f"Demo world (final round){size}, {a.test_users} test users" if a.world == "demo" else \
        "MovieLens-100k, ratings as actions (cold-start split, 10% of the films new)"
    say(f"\n{world}, {a.epochs} epochs, seeds {a.seeds}, mean ± std; "
        f"{a.threads or 'torch default'} thread(s)\n")
    say("| model, serving | " + " | ".join(f"{part} {k}" for part, k in METRIC_COLUMNS)
        + " | retrieve s | recall of the dense top-10 | invalid IDs |")
    say("|---|" + "---|" * (len(METRIC_COLUMNS) + 3))
    for name, rs in runs.items():
        say(f"| {name} | " + " | ".join(mean_std(r[part][k] for r in rs) for part, k in METRIC_COLUMNS)
            + f" | {mean_std((r['seconds'] for r in rs), 2)} | "
            + (mean_std(r["recall_of_dense_top10"] for r in rs) if "recall_of_dense_top10" in rs[0] else "-")
            + f" | {sum(r['retrieval'].get('invalid_ids', 0) for r in rs)} |")
    if a.curve:
        cold = a.cold_share if a.cold_share is not None else [0.0, round(float(np.mean(shares)), 3)]
        runs["curve"] = curve(first_ck, a.curve, a.curve_users, cold, a.beam_width, say)
    say.write(f"generative-{a.world}" + (f"-items{a.items}" if a.items else "") + (f"-users{a.users}" if a.users else ""),
              f"Generative retrieval: {world}")
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=1))
    return runs


@torch.no_grad()
def curve(ck: Path, sizes: list[int], n_users: int, shares: list[float], widths: list[int], say: Report) -> list[dict]:
    """Retrieval seconds of exact dense top-10 and of hybrid over random pools of each size (see the docstring)."""
    import time

    from evalu.generative import PoolIndex, beam_search, generative_topk
    from evalu.retrieval import topk_scored
    from evalu.shard import topk_user_chunk
    from genrec.recommender.checkpoint import load_checkpoint

    from scale import FakeStore

    model = load_checkpoint(ck).model.eval()
    model.items.set_store(FakeStore(model.schema, 0))  # random features: the queries only need the model's form
    sc, h, qb = model.schema, model.cfg.hidden, InferConfig.query_batch_size
    rng = np.random.default_rng(0)
    seqs = torch.as_tensor(rng.integers(1, sc.num_items + 1, (n_users, model.cfg.maxlen)))
    q = model.query(seqs, torch.zeros(n_users, len(sc.user_sparse), dtype=torch.long),
                    torch.zeros(n_users, len(sc.user_array), sc.array_len, dtype=torch.long))
    say(f"\n## Retrieval time as the pool grows: {n_users} users, random pool ({sc.sid_levels} x "
        f"{sc.sid_codebook} codes), {torch.get_num_threads()} thread(s)\n")
    say("Items never trained on (the cold share) are unreachable by the beam and scored densely by hybrid. The "
        "index (built once a run) is not in hybrid's time.\n")
    say("| candidates | cold share | serving | retrieval s | vs dense | s per 100k candidates | "
        "candidates scored per user | index build s |")
    say("|---|---|---|---|---|---|---|---|")
    rows = []
    for n in sizes:
        cand = torch.nn.functional.normalize(torch.randn(n, h, generator=torch.Generator().manual_seed(n)), dim=-1)
        if q.shape[1] > h:  # the item-bias component
            cand = torch.cat([cand, 0.1 * torch.randn(n, 1)], 1)
        codes = rng.integers(0, sc.sid_codebook, (n, sc.sid_levels))
        t0 = time.perf_counter()
        topk_scored(q, cand, 10, None, 0.0, "auto", topk_user_chunk(qb))
        dense = time.perf_counter() - t0
        rows.append({"candidates": n, "serving": "dense", "seconds": dense})
        say(f"| {n:,} | - | exact dense | {dense:.2f} | 1.0x | {dense / n * 1e5:.3f} | {n:,} | - |")
        for share in shares:
            t0 = time.perf_counter()
            index = PoolIndex(codes, sc.sid_codebook, unseen=rng.random(n) < share)
            t_index = time.perf_counter() - t0
            for w in widths:
                t0, scored = time.perf_counter(), 0
                cold = cand[torch.as_tensor(index.unreachable)]  # as infer does: once a run
                for b in range(0, n_users, qb):
                    ids, _, _ = beam_search(model.gen, q[b:b + qb, :h], index, w)
                    scored += generative_topk(ids, index, q[b:b + qb], cand, 10, None, 0.0, True, cold, "auto")[1]
                sec = time.perf_counter() - t0
                rows.append({"candidates": n, "cold_share": share, "serving": f"hybrid (beam {w})", "seconds": sec,
                             "scored_per_user": scored / n_users, "index_s": t_index})
                say(f"| {n:,} | {share:.1%} | hybrid (beam {w}) | {sec:.2f} | {dense / sec:.1f}x | "
                    f"{sec / n * 1e5:.3f} | {scored / n_users:,.0f} | {t_index:.2f} |", flush=True)
        del cand, index
    return rows


if __name__ == "__main__":
    main()
