"""Benchmark on real data: MovieLens-100k in the competition format, our product against RecBole's sequential
models run here on exactly the same split (needs the ml100k extra).

Splits: leave-one-out by time (each user's last rating is the test target, the one before it validates), full
ranking over all 1,682 items. "warm": every item appears in training; "cold-start" (one per seed): a seeded 10%
of items never appears in training, and only users whose target is one of them count.

Rules (both reported, each model selected on validation under the rule it is tested with):
  unfiltered   every item is ranked (RecBole's default for sequential models)
  filtered     the items of the user's history are removed first (our --filter-seen)

Per seed: RecBole's SASRec (dropout 0.2 and 0.5) and GRU4Rec on the warm split (bench/peers.py: their packaged
defaults, CE loss, stopped by validation patience, an epoch cap or a time budget, whichever comes first); our
model with and without semantic IDs on a fresh copy of each split (so every seed trains its own RQ-VAE).
Our model embeds the 384-d text vector directly (`--model-text direct`), or not at all (`--model-text none`):
then the semantic IDs made from it are its only view of the text, as when a feature is too large to embed per
item (the competition's 3584/4096-d features for millions of items); the IDs always come from that vector.
RecBole's published GRU4Rec figure on ml-100k (HR@10 0.1103, NDCG@10 0.0513, unfiltered) is a reference only.

    python bench/ml100k.py [--seeds 0 1 2 --epochs 120 --threads 1 --peers-cache peers.jsonl]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads its defaults from the env then
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genrec.core.cli import FlagParser, add_bool  # noqa: E402
sys.path.append(str(Path(__file__).resolve().parent))
from dataset.convert_ml100k import EMB_FID, _read_atomic, convert, embed, find_recbole_ml100k  # noqa: E402
from harness import Report, fresh_copy, mean_std, train_and_infer  # noqa: E402

PUBLISHED_GRU4REC = {"hr@10": 0.1103, "ndcg@10": 0.0513}
RULES = ("unfiltered", "filtered")


def _splits(a: argparse.Namespace, work: Path) -> dict[int, dict[str, Path]]:
    if a.data_root:
        root = Path(a.data_root)
        return {s: {"warm": root / f"warm{s}" if (root / f"warm{s}").is_dir() else root / "warm",
                    "cold-start": root / f"cold{s}"} for s in a.seeds}
    src = find_recbole_ml100k()
    rows = _read_atomic(src / "ml-100k.item")
    emb = embed([f"{r.get('movie_title', '')} ({r.get('release_year', '')}): "
                 f"{', '.join(r.get('class', '').split())}" for r in rows])  # once; every split reuses it
    warm = convert(work / "warm", src, 0.0, 0, emb, a.max_users)  # the warm split does not depend on the seed
    return {s: {"warm": warm, "cold-start": convert(work / f"cold{s}", src, a.cold_frac, s, emb, a.max_users)}
            for s in a.seeds}


def _peer_runs(a: argparse.Namespace, warm: Path, work: Path) -> list[dict]:
    """RecBole peers per seed, reusing runs of `--peers-cache` made on the same split with the same budget."""
    import peers

    seqs = peers.write_atomic(warm, work / "recbole", "split")
    digest = hashlib.sha256((work / "recbole" / "split" / "split.inter").read_bytes()).hexdigest()[:16]
    budget = {"max_epochs": a.peer_max_epochs, "time_budget": a.peer_time_budget, "patience": a.peer_patience,
              "threads": torch.get_num_threads()}
    cache = []
    if a.peers_cache and Path(a.peers_cache).is_file():
        cache = [json.loads(ln) for ln in Path(a.peers_cache).read_text().splitlines() if ln.strip()]
    out = []
    for seed in a.seeds:
        for label in a.peers:
            hit = next((r for r in cache if r.get("model") == label and r.get("seed") == seed
                        and r.get("split") == digest and r.get("budget") == budget), None)
            if hit is None:
                hit = peers.run_peer(label, work / "recbole", "split", seed, seqs, a.peer_max_epochs,
                                     a.peer_time_budget, a.peer_patience)
                hit.update(split=digest, budget=budget)
                if a.peers_cache:
                    with open(a.peers_cache, "a") as f:
                        f.write(json.dumps(hit) + "\n")
            print(f"seed {seed} {label:22s} " + "  ".join(
                f"{r} HR@10 {hit[r]['hr@10']:.4f} NDCG@10 {hit[r]['ndcg@10']:.4f}" for r in RULES)
                + f"  ({hit['epochs']} epochs, {hit['seconds']:.0f} s, stopped by {hit['stopped_by']}, "
                  f"targets agree {hit['targets_agree']}/{hit['test_users']})", flush=True)
            out.append(hit)
    return out


def main(argv: list[str] | None = None) -> dict:
    import peers

    p = FlagParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--cold_frac", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model_text", default="direct", choices=["direct", "none"],
                   help="our model embeds the text vector itself, or sees it only through the semantic IDs")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every model (default 1)")
    p.add_argument("--splits", nargs="+", default=["warm", "cold-start"], choices=["warm", "cold-start"],
                   help="which of our runs to make (the peers run on the warm split)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES),
                   help="warm split: the rules to train and test our model under (one model per rule)")
    p.add_argument("--ids", nargs="*", default=["without", "with"], choices=["without", "with"],
                   help="our model without and/or with semantic IDs (none: the peers only)")
    p.add_argument("--peers", nargs="*", default=list(peers.PEERS), choices=list(peers.PEERS),
                   help="RecBole models to run (none: skip them)")
    p.add_argument("--peer_max_epochs", type=int, default=200)
    p.add_argument("--peer_time_budget", type=float, default=2400.0, help="seconds of training per peer and seed")
    p.add_argument("--peer_patience", type=int, default=10, help="epochs without a better validation score")
    p.add_argument("--peers_cache", help="JSON lines of earlier peer runs: reused when split and budget match, "
                                         "new runs appended")
    p.add_argument("--data_root", help="use splits already converted here (warm/, cold{seed}/)")
    add_bool(p, "convert_only", False, "write the splits to --keep and stop")
    p.add_argument("--max_users", type=int, default=None, help="first users only (smoke tests)")
    p.add_argument("--keep", help="keep the work dir here")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="print the tables of earlier runs' --out files together (e.g. one seed per process) and stop")
    a = p.parse_args(argv)
    if a.merge:
        return _merge(a, p)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_ml100k_"))
    splits = _splits(a, work)
    if a.convert_only:
        return {}
    t0 = time.perf_counter()
    peer_runs = _peer_runs(a, splits[a.seeds[0]]["warm"], work) if a.peers else []
    ours: dict[tuple, list[dict]] = {}
    train_kw = dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, sid_mm_emb_id=[EMB_FID])
    for seed in a.seeds:
        for name, use in (("ours, no semantic ID", False), ("ours, semantic IDs", True)):
            if ("with" if use else "without") not in a.ids:
                continue
            model = {"use_semantic_ids": use, "mm_emb_id": [EMB_FID] if a.model_text == "direct" else []}
            for rule in a.rules if "warm" in a.splits else ():  # one model per rule, selected under that rule
                d = fresh_copy(splits[seed]["warm"], work / "run" / "data")
                r = train_and_infer(d, d, work / "run", seed, [rule], model, filter_seen=rule == "filtered",
                                    **train_kw)
                ours.setdefault(("warm", name, rule), []).append({**r[rule]["overall"], "seconds": r["seconds"]})
            if "cold-start" in a.splits:
                d = fresh_copy(splits[seed]["cold-start"], work / "run" / "data")
                r = train_and_infer(d, d, work / "run", seed, ["chosen", "filtered", "unfiltered"], model, **train_kw)
                for rule in RULES:
                    ours.setdefault(("cold-start", name, rule), []).append({**r[rule]["cold_start"], "seed": seed,
                                                                           "seconds": r["seconds"]})
                ours.setdefault(("cold-start", name, "chosen"), []).append({"filtered": r["chosen_rule"]})
            print(f"seed {seed} {name:22s} " + ", ".join(
                f"{split} HR@10 " + " / ".join(f"{ours[(split, name, rule)][-1]['hr@10']:.4f} ({rule})"
                                              for rule in RULES if (split, name, rule) in ours)
                for split in ("warm", "cold-start") if split in a.splits), flush=True)
    report = _tables(a, peer_runs, ours)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["seeds"] = a.seeds
    report["model_text"] = a.model_text
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


def _merge(a: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """Tables over several --out files: their seeds, peer runs and runs of ours, concatenated in the given order."""
    peer_runs: list[dict] = []
    ours: dict[tuple, list[dict]] = {}
    seeds: list[int] = []
    texts: list[str] = []
    for path in a.merge:
        rep = json.loads(Path(path).read_text())
        texts.append(rep.get("model_text", "direct"))  # files older than the flag: direct
        if texts[-1] != texts[0]:
            p.error(f"--merge: {path} has --model-text {texts[-1]}, {a.merge[0]} {texts[0]}: runs of different models")
        seeds += rep.get("seeds", [])
        peer_runs += rep["peers"]
        for k, v in rep["ours"].items():
            if len(v) == len(rep.get("seeds", [])):  # one run per seed, in seed order (older files lack "seed")
                v = [{"seed": s, **x} for s, x in zip(rep["seeds"], v)]
            ours.setdefault(tuple(k.split(" | ")), []).extend(v)
    a.seeds = list(dict.fromkeys(seeds)) or a.seeds  # one process per seed and variant repeats seeds
    a.model_text = texts[0] if texts else a.model_text
    return _tables(a, peer_runs, ours)


def _tables(a: argparse.Namespace, peer_runs: list[dict], ours: dict[tuple, list[dict]]) -> dict:
    dev = "cpu"
    say = Report()
    say(f"\n# ml-100k on {dev} ({a.threads} thread(s) per model), leave-one-out by time, full ranking over all items, "
          f"seeds {a.seeds}, mean ± std over seeds; ours: {a.epochs} epochs, batch {a.batch_size}, lr {a.lr}, text "
          f"{'embedded directly' if a.model_text == 'direct' else 'through the semantic IDs only'}; peers: "
          f"RecBole defaults, at most {a.peer_max_epochs} epochs / {a.peer_time_budget:.0f} s / patience {a.peer_patience}")
    say("\n| model (warm split) | HR@10 unfiltered | NDCG@10 unfiltered | HR@10 filtered | NDCG@10 filtered "
          "| epochs | seconds per run |")
    say("|---|---|---|---|---|---|---|")
    rows: dict[str, dict] = {}
    for label in dict.fromkeys(r["model"] for r in peer_runs):
        rs = [r for r in peer_runs if r["model"] == label]
        rows[f"RecBole {label}"] = {rule: [r[rule] for r in rs] for rule in RULES}
        say(f"| RecBole {label} | " + " | ".join(mean_std(r[rule][m] for r in rs) for rule in RULES
                                                   for m in ("hr@10", "ndcg@10"))
              + f" | {'/'.join(str(r['epochs']) for r in rs)} ({'/'.join(r['stopped_by'] for r in rs)})"
              + f" | {mean_std((r['seconds'] for r in rs), 0)} |")
    for name in ("ours, no semantic ID", "ours, semantic IDs"):
        by = {rule: ours.get(("warm", name, rule), []) for rule in RULES}
        if not any(by.values()):
            continue
        rows[name] = by
        say(f"| {name} | " + " | ".join(mean_std(m[k] for m in by[rule]) for rule in RULES
                                          for k in ("hr@10", "ndcg@10"))
              + f" | {a.epochs} | {mean_std((m['seconds'] for m in by['filtered'] + by['unfiltered']), 0)} |")
    say(f"| RecBole GRU4Rec, published (reference, not run here) | {PUBLISHED_GRU4REC['hr@10']:.4f} | "
          f"{PUBLISHED_GRU4REC['ndcg@10']:.4f} | | | | |")
    if peer_runs:
        agree = sum(r["targets_agree"] for r in peer_runs), sum(r["test_users"] for r in peer_runs)
        say(f"\nTest targets identical in RecBole's split and ours: {agree[0]} of {agree[1]} user-runs.")
    checks = []
    best_peer = [k for k in rows if k.startswith("RecBole")]
    if best_peer and "ours, semantic IDs" in rows:
        for rule in RULES:
            if not all(rows[k][rule] for k in [*best_peer, "ours, semantic IDs"]):
                continue
            for m in ("hr@10", "ndcg@10"):
                ours_v = np.array([x[m] for x in rows["ours, semantic IDs"][rule]])
                bp = max(best_peer, key=lambda k: np.mean([x[m] for x in rows[k][rule]]))
                peer_v = np.array([x[m] for x in rows[bp][rule]])
                margin, need = ours_v.mean() - peer_v.mean(), max(ours_v.std(), peer_v.std())
                checks.append(f"warm {rule} {m}: ours {ours_v.mean():.4f} vs best peer ({bp}) {peer_v.mean():.4f}: "
                              f"margin {margin:+.4f}, larger std {need:.4f} -> {'MET' if margin > need else 'MISSED'}")
    say("\n| model (cold-start split) | rule chosen by validation | HR@10 unfiltered | NDCG@10 unfiltered "
          "| HR@10 filtered | NDCG@10 filtered | users |")
    say("|---|---|---|---|---|---|---|")
    for name in ("ours, no semantic ID", "ours, semantic IDs"):
        by = {rule: ours.get(("cold-start", name, rule), []) for rule in RULES}
        if not by["filtered"]:
            continue
        chosen = "/".join("filtered" if c["filtered"] else "unfiltered" for c in ours[("cold-start", name, "chosen")])
        say(f"| {name} | {chosen} | " + " | ".join(mean_std(m[k] for m in by[rule]) for rule in RULES
                                                    for k in ("hr@10", "ndcg@10"))
              + f" | {'/'.join(str(m['users']) for m in by['filtered'])} |")
    if ours.get(("cold-start", "ours, semantic IDs", "filtered")) and ours.get(("cold-start", "ours, no semantic ID", "filtered")):
        for rule in RULES:
            for m in ("hr@10", "ndcg@10"):
                w = np.array([x[m] for x in ours[("cold-start", "ours, semantic IDs", rule)]])
                wo = np.array([x[m] for x in ours[("cold-start", "ours, no semantic ID", rule)]])
                ratio = w.mean() / wo.mean() if wo.mean() > 0 else float("inf")
                sep = w.mean() - w.std() > wo.mean() + wo.std()
                checks.append(f"cold-start {rule} {m}: with IDs {w.mean():.4f} ± {w.std():.4f} vs without "
                              f"{wo.mean():.4f} ± {wo.std():.4f}: {ratio:.2f}x, bands "
                              f"{'separate' if sep else 'overlap'} -> {'MET' if ratio >= 1.2 and sep else 'MISSED'}"
                              + _paired(ours, rule, m))
    if checks:
        say("\nTargets:\n" + "\n".join(f"- {c}" for c in checks))
    say.write("ml100k", "MovieLens-100k: ours against RecBole's models")
    return {"peers": peer_runs, "ours": {" | ".join(k): v for k, v in ours.items()}, "checks": checks}


def _paired(ours: dict[tuple, list[dict]], rule: str, m: str) -> str:
    """The split moves both models' cold-start figures together (which films are cold): the difference per seed
    shows the IDs' effect without that shared part. Runs are paired by their recorded seed."""
    by_seed = [{x["seed"]: x[m] for x in ours[("cold-start", name, rule)] if "seed" in x}
               for name in ("ours, semantic IDs", "ours, no semantic ID")]
    d = np.array([by_seed[0][s] - by_seed[1][s] for s in by_seed[0] if s in by_seed[1]])
    if not len(d):
        return ""
    return (f"; paired by seed: difference {d.mean():+.4f} ± {d.std():.4f}, with IDs higher in {(d > 0).sum()}, "
            f"lower in {(d < 0).sum()} of {len(d)} seeds")


if __name__ == "__main__":
    main()
