"""The demo world: a deterministic train + eval directory in the competition format, with an ad log's actions.

The story. Items belong to latent topics and have a quality and a conversion propensity. The platform shows a
user items (exposures, action 0): a share of them promoted (popular items whatever the user likes), the rest from
the topic the user is on, picked by popularity. The user clicks (action 1) according to taste (how much they like
the item's topic) and the item's quality; a share of clicks converts (action 2 in the final round) according to
the item's propensity. After a click the platform mostly stays on the clicked item's topic. So what was clicked,
not what was shown, tells what the user will click next. Content carries quality and propensity, noisily: a direction of the 1024-d
feature 82 each, and the sparse features 114 (quality tier) and 115 (propensity tier); feature 81 (32-d) and the
sparse feature 100 carry the topic. So content, and semantic IDs made from it, tell something about an item never
seen in training ("cold": absent from training, present in the candidate pool and as test targets).

Test users' targets are their next click or conversion; `final_round` writes conversions as action 2 (else they
stay clicks, action 1), `user_action_type.json` and labels with action_type 2, as the competition's final round.

    python -m dataset.synth --out DIR [--eval_out DIR2] [--final_round] [--users 2000 --test_users 500 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from genrec.core.cli import (FlagParser, add_dataclass_arguments, add_logging_arguments, fraction, from_namespace,
                             run_cli, setup_logging)
from genrec.core.safeio import atomic_open, write_json

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
    mm: tuple = ((81, 32), (82, 1024))
    # Noise of each feature's projection: the cheap 32-d feature 81 is noisy, the 1024-d one is not (as in the
    # competition, where 82-86 come from much larger models). Features not listed get 0.3.
    mm_noise: tuple = ((81, 1.0),)
    topic_share: float = 0.8  # share of items whose sparse feature 100 is their topic (the others: a random one)
    # Oracle for ceiling runs: feature 112 is the item's popularity decile (1-10) instead of noise, so content then
    # tells what only an item's history can tell otherwise.
    popularity_feature: bool = False
    # Noise (in standard deviations of quality / propensity) through which features 114 / 115 tell the tiers;
    # 0 for ceiling runs (the exact tiers, an oracle).
    tier_noise: float = 1.0
    final_round: bool = False  # conversions written as action 2, user_action_type.json, labels with action 2
    promoted_share: float = 0.25  # share of exposures the platform fills with promoted items
    promoted_frac: float = 0.1  # share of items that are promoted (the most popular ones more often)
    # For the user's topic the platform shows an item in proportion to popularity x exp(exposure_quality x quality)
    # (promoted items: by popularity alone). At 0 the platform does not know quality: it drives clicks only, so what
    # is shown and what is clicked differ most.
    exposure_quality: float = 0.0
    popularity_shape: float = 1.2  # Pareto shape of item popularity (smaller: a heavier tail)
    click_base: float = -4.0  # click logit = click_base + taste_weight * liking of the topic + quality_weight * quality
    taste_weight: float = 2.5
    quality_weight: float = 2.5
    conversion_base: float = -2.0  # conversion logit given a click = conversion_base + propensity_weight * propensity
    propensity_weight: float = 2.5
    interest_weight: float = 0.0  # click logit bonus for the topic of the user's last click (their current interest)
    stick_on_click: float = 0.85  # after a click, the platform shows the clicked item's topic with this probability
    stick_on_skip: float = 0.8  # after an exposure without a click, the user stays on the topic they were on
    seed: int = 0

    HELP = {"users": "training users", "test_users": "users in the eval dir", "items": "items (before cold ones)",
            "cold_frac": "share of items kept out of training (cold: only in the candidate pool and test targets; 0-1)",
            "topic_share": "share of items whose feature 100 is their topic (0-1)",
            "promoted_share": "share of exposures the platform fills with promoted items (0-1)",
            "final_round": "write conversions (action 2), user_action_type.json and labels with action_type 2, as "
                           "the competition's final round",
            "popularity_feature": "feature 112 = popularity decile (an oracle)",
            "tier_noise": "noise of the quality / propensity tiers in features 114 / 115 (0: exact, an oracle)"}


ACTION_TYPE_FILE = "user_action_type.json"


def _fmt_rows(ids: np.ndarray, mat: np.ndarray) -> str:
    row_fmt = ",".join(["%.5g"] * mat.shape[1])
    return "".join('{"anonymous_cid": %d, "emb": [%s]}\n' % (c, row_fmt % tuple(r)) for c, r in zip(ids, mat.tolist()))


EVAL_FILES = ("predict_seq.jsonl", "predict_seq_offsets.pkl", "predict_set.jsonl", "labels.jsonl", ACTION_TYPE_FILE)
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
            if (Path(out) / name).exists():  # user_action_type.json: final round only
                shutil.move(str(Path(out) / name), str(ev / name))
        for name in SHARED_FILES:
            src = Path(out) / name
            if src.is_dir():
                shutil.copytree(src, ev / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
            else:
                shutil.copy2(src, ev / name)
    return Path(out)


def _tier(x: np.ndarray, noise: float, rng: np.random.Generator, tiers: int = 5) -> np.ndarray:
    """1..tiers: the quantile tier of x seen through Gaussian noise of std `noise` (0: exact)."""
    seen = x + noise * rng.normal(size=len(x))
    return 1 + np.searchsorted(np.quantile(seen, np.linspace(0, 1, tiers + 1)[1:-1]), seen)


def _generate(out: Path, cfg: SynthConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    N, T = cfg.items, cfg.topics
    topic_vec = rng.normal(size=(T, cfg.latent_dim))
    topic = rng.integers(0, T, N)
    latent = topic_vec[topic] + 0.5 * rng.normal(size=(N, cfg.latent_dim))
    pop = rng.pareto(cfg.popularity_shape, N) + 1.0
    quality = rng.normal(size=N)
    propensity = rng.normal(size=N)
    creative = (rng.choice(90_000_000, N, replace=False) + 10_000_000).astype(np.int64)
    cold = rng.random(N) < cfg.cold_frac
    warm_idx = np.flatnonzero(~cold)
    reid = np.zeros(N, np.int64)
    reid[warm_idx] = np.arange(1, len(warm_idx) + 1)  # re-ids 1..num_warm, in item order
    shown = pop * np.exp(cfg.exposure_quality * quality)  # how often the platform shows an item
    promoted = rng.choice(N, max(1, int(cfg.promoted_frac * N)), replace=False)
    promoted_cum = np.cumsum(pop[promoted])  # paid reach: by popularity, whatever the quality
    p_convert = 1 / (1 + np.exp(-(cfg.conversion_base + cfg.propensity_weight * propensity)))

    # Item sparse features (re-ids from 1): 100 ~ topic (topic_share), 101 random, 102 ~ topic pair, 112 random,
    # 114 ~ quality tier, 115 ~ propensity tier (through noise tier_noise).
    f100 = np.where(rng.random(N) < cfg.topic_share, topic, rng.integers(0, T, N)) + 1
    f101 = rng.integers(1, 51, N)
    f102 = np.where(rng.random(N) < 0.7, topic // 2, rng.integers(0, (T + 1) // 2, N)) + 1
    f112 = rng.integers(1, 11, N)  # drawn either way: the oracle's world differs from the default one in f112 only
    if cfg.popularity_feature:
        f112 = 1 + np.argsort(np.argsort(pop, kind="stable"), kind="stable") * 10 // N
    f114, f115 = _tier(quality, cfg.tier_noise, rng), _tier(propensity, cfg.tier_noise, rng)
    item_feats = [{"100": int(a), "101": int(b), "102": int(c), "112": int(d), "114": int(e), "115": int(g)}
                  for a, b, c, d, e, g in zip(f100, f101, f102, f112, f114, f115)]

    by_topic, by_topic_cum = [], []
    for t in range(T):
        m = np.flatnonzero(topic == t)
        if len(m) == 0:
            m = np.array([rng.integers(0, N)])
        by_topic.append(m)
        by_topic_cum.append(np.cumsum(shown[m]))

    all_topics = np.arange(T)

    def pick(members: np.ndarray, cum: np.ndarray, u: float) -> int:
        """The member whose share of the cumulative weights `cum` holds the uniform draw `u`."""
        return int(members[min(int(np.searchsorted(cum, u * cum[-1])), len(members) - 1)])

    def walk(pref: np.ndarray, length: int) -> tuple[list[int], list[int]]:
        """One user's log: (items shown, actions 0/1/2); at least `length` steps, then on until a click at a
        position > 0 (every user has a target)."""
        items, acts = [], []
        cum = np.cumsum(pref)
        liking = pref / pref.max()
        t = pick(all_topics, cum, rng.random())
        interest, k = -1, 0
        while k < length or not any(acts[1:]):
            u = rng.random(6)  # promoted?, item, click, convert, stay?, topic
            if u[0] < cfg.promoted_share:
                i = pick(promoted, promoted_cum, u[1])
            else:
                i = pick(by_topic[t], by_topic_cum[t], u[1])
            logit = cfg.click_base + cfg.taste_weight * liking[topic[i]] + cfg.quality_weight * quality[i] \
                + cfg.interest_weight * (topic[i] == interest)
            clicked = u[2] < 1 / (1 + np.exp(-logit))
            items.append(i)
            acts.append(0 if not clicked else 2 if u[3] < p_convert[i] else 1)
            if clicked:
                interest = int(topic[i])  # a click tells the user's current interest
            if clicked and u[4] < cfg.stick_on_click:
                t = int(topic[i])  # and the platform follows it
            elif not (clicked or u[4] < cfg.stick_on_skip):
                t = pick(all_topics, cum, u[5])
            k += 1
        return items, acts

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

    def logged(a: int) -> int:
        return a if cfg.final_round or a < 2 else 1  # before the final round a conversion is logged as a click

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
                recs.append([u, int(reid[i]), None, item_feats[i], logged(a), ts])
            recs.append([u, None, user_feats(), None, None, ts + 1])
            line = json.dumps(recs, separators=(",", ":")) + "\n"
            offs.append(pos)
            pos += len(line.encode())
            f.write(line)
    with atomic_open(out / "seq_offsets.pkl", "wb") as f:
        pickle.dump(offs, f)

    # --- test users: history (cold items by raw creative id), then the last click or conversion as label ---
    offs, labels, pos = [], [], 0
    with atomic_open(out / "predict_seq.jsonl", "w", encoding="utf-8") as f:
        for u in range(cfg.test_users):
            pref = prefs()
            uid = f"user_{u:08d}"
            items, acts = walk(pref, int(rng.integers(cfg.min_len, cfg.max_len + 1)))
            cut = max(k for k, a in enumerate(acts) if a)
            ts = 1_700_000_000 + int(rng.integers(0, 10_000_000))
            recs = []
            for i, a in zip(items[:cut], acts[:cut]):
                ts += int(rng.integers(1, 600))
                item_id = int(creative[i]) if cold[i] else int(reid[i])
                recs.append([uid, item_id, None, record_feats(i), logged(a), ts])
            recs.append([uid, None, user_feats(), None, None, ts + 1])
            line = json.dumps(recs, separators=(",", ":")) + "\n"
            offs.append(pos)
            pos += len(line.encode())
            f.write(line)
            target = items[cut]
            labels.append({"user_id": uid, "creative_id": int(creative[target]), "action_type": logged(acts[cut]),
                           "cold": bool(cold[target])})
    with atomic_open(out / "predict_seq_offsets.pkl", "wb") as f:
        pickle.dump(offs, f)
    with atomic_open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in labels)
    if cfg.final_round:
        write_json(out / ACTION_TYPE_FILE, {x["user_id"]: x["action_type"] for x in labels}, compact=True)

    # --- candidate pool: every item, warm and cold ---
    with atomic_open(out / "predict_set.jsonl", "w", encoding="utf-8") as f:
        for r, i in enumerate(rng.permutation(N)):
            f.write(json.dumps({"creative_id": int(creative[i]), "retrieval_id": r, "features": record_feats(i)}) + "\n")

    # --- indexer and item features (warm items only, as in the competition) ---
    tiers = {v * 7 + 3: v for v in range(1, 6)}
    indexer = {
        "u": {f"train_user_{u:08d}": u for u in range(1, cfg.users + 1)},
        "i": {int(creative[i]): int(reid[i]) for i in warm_idx},
        "f": {"100": {v * 7 + 3: v for v in range(1, T + 1)}, "101": {v * 7 + 3: v for v in range(1, 51)},
              "102": {v * 7 + 3: v for v in range(1, (T + 1) // 2 + 1)}, "112": {v * 7 + 3: v for v in range(1, 11)},
              "114": dict(tiers), "115": dict(tiers),
              "103": {v: v for v in range(1, 6)}, "104": {v: v for v in range(1, 3)},
              "106": {v: v for v in range(1, 21)}},
    }
    with atomic_open(out / "indexer.pkl", "wb") as f:
        pickle.dump(indexer, f)
    write_json(out / "item_feat_dict.json", {str(int(reid[i])): item_feats[i] for i in warm_idx}, compact=True)

    # --- creative_emb: noisy projections of the latent, a few items missing each feature; the 1024-d feature
    # (any feature wider than the latent space but 81) also carries quality and propensity along two directions ---
    for fid, dim in cfg.mm:
        proj = rng.normal(size=(cfg.latent_dim, dim)) / np.sqrt(cfg.latent_dim)
        noise = dict(cfg.mm_noise).get(fid, 0.3)
        emb = latent @ proj + noise * rng.normal(size=(N, dim))
        if fid != 81 and dim > 2 * cfg.latent_dim:
            dirs = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T  # two orthonormal directions
            strength = 2 * np.sqrt(dim / cfg.latent_dim)  # twice a topic direction's spread
            seen = np.stack([quality, propensity], 1) + 0.3 * rng.normal(size=(N, 2))
            emb += strength * seen @ dirs
        emb = emb.astype(np.float32)
        has = rng.random(N) >= cfg.missing_frac
        folder = out / "creative_emb" / f"emb_{fid}_{dim}"
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(has)
        for part, chunk in enumerate(np.array_split(idx, 2)):
            with atomic_open(folder / f"part-{part:05d}", "w", encoding="utf-8") as f:
                for lo in range(0, len(chunk), 20_000):
                    sel = chunk[lo:lo + 20_000]
                    f.write(_fmt_rows(creative[sel], emb[sel]))
    log.info("demo world%s: %d items (%d cold), %d train users, %d test users -> %s",
             " (final round)" if cfg.final_round else "", N, int(cold.sum()), cfg.users, cfg.test_users, out)


def _pairs(cast: type) -> Callable[[str], tuple]:
    """argparse type: `fid:value`."""
    def parse(text: str) -> tuple:
        try:
            fid, value = text.split(":")
            return int(fid), cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not fid:{cast.__name__}") from None
    return parse


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__)
    p.add_argument("--out", required=True, help="training dir (and eval dir unless --eval_out)")
    p.add_argument("--eval_out", default=None, help="write the evaluation files to this separate dir")
    fractions = ("cold_frac", "missing_frac", "topic_share", "promoted_share", "promoted_frac", "stick_on_click",
                 "stick_on_skip")
    add_dataclass_arguments(p, SynthConfig, skip={"mm", "mm_noise"}, types={f: fraction for f in fractions})
    d = SynthConfig()
    p.add_argument("--mm", nargs="+", type=_pairs(int), default=None,
                   help=f"fid:dim of each creative_emb feature; default {' '.join(f'{a}:{b}' for a, b in d.mm)}")
    p.add_argument("--mm_noise", nargs="+", type=_pairs(float), default=None,
                   help=f"fid:noise of a feature's projection (others 0.3); default "
                        f"{' '.join(f'{a}:{b}' for a, b in d.mm_noise)}")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(a)

    def body() -> int:
        extra = {k: tuple(getattr(a, k)) for k in ("mm", "mm_noise") if getattr(a, k)}
        generate(a.out, from_namespace(SynthConfig, a, **extra), a.eval_out)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
