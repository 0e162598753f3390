"""The demo world: a deterministic train + eval directory in the competition format.

Items belong to latent topics; their multimodal embeddings are noisy projections of the topic vectors and
one sparse feature is a noisy copy of the topic. Users prefer a few topics and move between them in a Markov
chain, so both the sequence and the item content carry signal; within a topic, an item is picked by its
popularity, which nothing in its content tells. A share of items ("cold") never appears in training but does
appear in the candidate pool and as test targets.

    python -m dataset.synth --out DIR [--users 2000 --test-users 500 --items 2000 --seed 0]
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import FlagParser, add_logging_arguments, fraction, setup_logging
from .safeio import atomic_open, write_json

log = logging.getLogger(__name__)


@dataclass
class SynthConfig:
    users: int = 2000
    test_users: int = 500
    items: int = 2000
    topics: int = 24
    latent_dim: int = 16
    cold_frac: float = 0.1
    missing_frac: float = 0.03
    min_len: int = 20
    max_len: int = 100
    click_prob: float = 0.3
    mm: tuple = ((81, 32), (82, 1024))
    # Noise of each feature's projection: the cheap 32-d feature 81 is noisy, the 1024-d one is not (as in the
    # competition, where 82-86 come from much larger models). Features not listed get 0.3.
    mm_noise: tuple = ((81, 1.0),)
    topic_share: float = 0.8  # share of items whose sparse feature 100 is their topic (the others: a random one)
    # Oracle for ceiling runs: feature 112 is the item's popularity decile (1-10) instead of noise, so content then
    # tells what only an item's history can tell otherwise.
    popularity_feature: bool = False
    seed: int = 0


def _fmt_rows(ids: np.ndarray, mat: np.ndarray) -> str:
    row_fmt = ",".join(["%.5g"] * mat.shape[1])
    return "".join('{"anonymous_cid": %d, "emb": [%s]}\n' % (c, row_fmt % tuple(r)) for c, r in zip(ids, mat.tolist()))


EVAL_FILES = ("predict_seq.jsonl", "predict_seq_offsets.pkl", "predict_set.jsonl", "labels.jsonl")
SHARED_FILES = ("indexer.pkl", "item_feat_dict.json", "creative_emb")


def generate(out: str | Path, cfg: SynthConfig = SynthConfig(), eval_out: str | Path | None = None) -> Path:
    """Write the whole world to `out` (created); returns the path. With `eval_out`, the evaluation files go
    there instead, with copies of the files the competition's eval dir also carries (indexer, item features,
    creative_emb), as two separate directories like the competition's TRAIN_DATA_PATH and EVAL_DATA_PATH."""
    _generate(Path(out), cfg)
    if eval_out is not None:
        ev = Path(eval_out)
        ev.mkdir(parents=True, exist_ok=True)
        for name in EVAL_FILES:
            shutil.move(str(Path(out) / name), str(ev / name))
        for name in SHARED_FILES:
            src = Path(out) / name
            if src.is_dir():
                shutil.copytree(src, ev / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
            else:
                shutil.copy2(src, ev / name)
    return Path(out)


def _generate(out: Path, cfg: SynthConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    N, T = cfg.items, cfg.topics
    topic_vec = rng.normal(size=(T, cfg.latent_dim))
    topic = rng.integers(0, T, N)
    latent = topic_vec[topic] + 0.5 * rng.normal(size=(N, cfg.latent_dim))
    pop = rng.pareto(1.2, N) + 1.0
    creative = (rng.choice(90_000_000, N, replace=False) + 10_000_000).astype(np.int64)
    cold = rng.random(N) < cfg.cold_frac
    warm_idx = np.flatnonzero(~cold)
    reid = np.zeros(N, np.int64)
    reid[warm_idx] = np.arange(1, len(warm_idx) + 1)  # re-ids 1..num_warm, in item order

    # Item sparse features (re-ids from 1): 100 ~ topic (topic_share), 101 random, 102 ~ topic pair, 112 random.
    f100 = np.where(rng.random(N) < cfg.topic_share, topic, rng.integers(0, T, N)) + 1
    f101 = rng.integers(1, 51, N)
    f102 = np.where(rng.random(N) < 0.7, topic // 2, rng.integers(0, (T + 1) // 2, N)) + 1
    f112 = rng.integers(1, 11, N)  # drawn either way: the oracle's world differs from the default one in f112 only
    if cfg.popularity_feature:
        f112 = 1 + np.argsort(np.argsort(pop, kind="stable"), kind="stable") * 10 // N
    item_feats = [{"100": int(a), "101": int(b), "102": int(c), "112": int(d)} for a, b, c, d in zip(f100, f101, f102, f112)]

    # Topic transitions: stay (0.5) or jump to a user-preferred topic.
    def walk(pref: np.ndarray, length: int) -> tuple[list[int], list[int]]:
        items, acts = [], []
        cum = np.cumsum(pref)
        u = rng.random((length, 4))  # stay?, topic, item, click
        t = min(int(np.searchsorted(cum, u[0, 1] * cum[-1])), T - 1)
        for k in range(length):
            if u[k, 0] > 0.5:
                t = min(int(np.searchsorted(cum, u[k, 1] * cum[-1])), T - 1)
            members, mc = by_topic[t], by_topic_cum[t]
            items.append(int(members[min(int(np.searchsorted(mc, u[k, 2] * mc[-1])), len(members) - 1)]))
            p_click = cfg.click_prob * (1.6 if pref[t] > 0.3 else 0.6)
            acts.append(int(u[k, 3] < min(p_click, 0.95)))
        return items, acts

    by_topic, by_topic_cum = [], []
    for t in range(T):
        m = np.flatnonzero(topic == t)
        if len(m) == 0:
            m = np.array([rng.integers(0, N)])
        by_topic.append(m)
        by_topic_cum.append(np.cumsum(pop[m]))

    def prefs() -> np.ndarray:
        p = np.zeros(T)
        p[rng.choice(T, 3, replace=False)] = rng.dirichlet([1.0, 1.0, 1.0])
        return 0.9 * p + 0.1 / T

    def user_feats() -> dict:
        return {"103": int(rng.integers(1, 6)), "104": int(rng.integers(1, 3)),
                "106": [int(x) for x in rng.choice(np.arange(1, 21), rng.integers(1, 4), replace=False)]}

    def record_feats(i: int) -> dict:
        f = dict(item_feats[i])
        if cold[i] and rng.random() < 0.2:
            f["101"] = f"unseen_{f['101']}"  # a value never seen in training arrives as a string
        return f

    # --- training sequences (warm items only) ---
    seq_path, offs = out / "seq.jsonl", []
    with atomic_open(seq_path, "w", encoding="utf-8") as f:
        pos = 0
        for u in range(1, cfg.users + 1):
            pref = prefs()
            items, acts = walk(pref, int(rng.integers(cfg.min_len, cfg.max_len + 1)))
            recs = []
            ts = 1_700_000_000 + int(rng.integers(0, 10_000_000))
            for i, a in zip(items, acts):
                if cold[i]:
                    continue
                ts += int(rng.integers(1, 600))
                recs.append([u, int(reid[i]), None, item_feats[i], a, ts])
            recs.append([u, None, user_feats(), None, None, ts + 1])
            line = json.dumps(recs, separators=(",", ":")) + "\n"
            offs.append(pos)
            pos += len(line.encode())
            f.write(line)
    with atomic_open(out / "seq_offsets.pkl", "wb") as f:
        pickle.dump(offs, f)

    # --- test users: history (cold items by raw creative id), then the next click as label ---
    offs, labels, pos = [], [], 0
    with atomic_open(out / "predict_seq.jsonl", "w", encoding="utf-8") as f:
        for u in range(cfg.test_users):
            pref = prefs()
            uid = f"user_{u:08d}"
            items, acts = walk(pref, int(rng.integers(cfg.min_len, cfg.max_len + 1)))
            clicks = [k for k, a in enumerate(acts) if a]
            if not clicks or clicks[-1] == 0:
                items, acts, clicks = items + items[-1:], acts[:-1] + [0, 1], [len(items)]
            cut = clicks[-1]
            target = items[cut]
            ts = 1_700_000_000 + int(rng.integers(0, 10_000_000))
            recs = []
            for i, a in zip(items[:cut], acts[:cut]):
                ts += int(rng.integers(1, 600))
                item_id = int(creative[i]) if cold[i] else int(reid[i])
                recs.append([uid, item_id, None, record_feats(i), a, ts])
            recs.append([uid, None, user_feats(), None, None, ts + 1])
            line = json.dumps(recs, separators=(",", ":")) + "\n"
            offs.append(pos)
            pos += len(line.encode())
            f.write(line)
            labels.append({"user_id": uid, "creative_id": int(creative[target]), "action_type": 1,
                           "cold": bool(cold[target])})
    with atomic_open(out / "predict_seq_offsets.pkl", "wb") as f:
        pickle.dump(offs, f)
    with atomic_open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in labels)

    # --- candidate pool: every item, warm and cold ---
    with atomic_open(out / "predict_set.jsonl", "w", encoding="utf-8") as f:
        for r, i in enumerate(rng.permutation(N)):
            f.write(json.dumps({"creative_id": int(creative[i]), "retrieval_id": r, "features": record_feats(i)}) + "\n")

    # --- indexer and item features (warm items only, as in the competition) ---
    indexer = {
        "u": {f"train_user_{u:08d}": u for u in range(1, cfg.users + 1)},
        "i": {int(creative[i]): int(reid[i]) for i in warm_idx},
        "f": {"100": {v * 7 + 3: v for v in range(1, T + 1)}, "101": {v * 7 + 3: v for v in range(1, 51)},
              "102": {v * 7 + 3: v for v in range(1, (T + 1) // 2 + 1)}, "112": {v * 7 + 3: v for v in range(1, 11)},
              "103": {v: v for v in range(1, 6)}, "104": {v: v for v in range(1, 3)},
              "106": {v: v for v in range(1, 21)}},
    }
    with atomic_open(out / "indexer.pkl", "wb") as f:
        pickle.dump(indexer, f)
    write_json(out / "item_feat_dict.json", {str(int(reid[i])): item_feats[i] for i in warm_idx}, compact=True)

    # --- creative_emb: noisy projections of the latent, a few items missing each feature ---
    for fid, dim in cfg.mm:
        proj = rng.normal(size=(cfg.latent_dim, dim)) / np.sqrt(cfg.latent_dim)
        noise = dict(cfg.mm_noise).get(fid, 0.3)
        emb = (latent @ proj + noise * rng.normal(size=(N, dim))).astype(np.float32)
        has = rng.random(N) >= cfg.missing_frac
        folder = out / "creative_emb" / f"emb_{fid}_{dim}"
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(has)
        for part, chunk in enumerate(np.array_split(idx, 2)):
            with atomic_open(folder / f"part-{part:05d}", "w", encoding="utf-8") as f:
                for lo in range(0, len(chunk), 20_000):
                    sel = chunk[lo:lo + 20_000]
                    f.write(_fmt_rows(creative[sel], emb[sel]))
    log.info("demo world: %d items (%d cold), %d train users, %d test users -> %s",
             N, int(cold.sum()), cfg.users, cfg.test_users, out)


def main(argv: list[str] | None = None) -> None:
    p = FlagParser(description=__doc__)
    p.add_argument("--out", required=True, help="training dir (and eval dir unless --eval-out)")
    p.add_argument("--eval-out", default=None, help="write the evaluation files to this separate dir")
    d = SynthConfig()
    for name in ("users", "test_users", "items", "topics", "seed", "min_len", "max_len"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name))
    p.add_argument("--cold-frac", type=float, default=d.cold_frac)
    p.add_argument("--topic-share", type=fraction, default=d.topic_share,
                   help="share of items whose feature 100 is their topic (0-1)")
    p.add_argument("--popularity-feature", action="store_true", help="feature 112 = popularity decile (an oracle)")
    p.add_argument("--mm", nargs="+", default=[f"{a}:{b}" for a, b in d.mm], help="fid:dim of each creative_emb feature")
    add_logging_arguments(p)
    a = p.parse_args(argv)
    setup_logging(a)
    mm = tuple(tuple(int(x) for x in s.split(":")) for s in a.mm)
    cfg = SynthConfig(users=a.users, test_users=a.test_users, items=a.items, topics=a.topics, seed=a.seed,
                      min_len=a.min_len, max_len=a.max_len, cold_frac=a.cold_frac, mm=mm, topic_share=a.topic_share,
                      popularity_feature=a.popularity_feature)
    generate(a.out, cfg, a.eval_out)


if __name__ == "__main__":
    main()
