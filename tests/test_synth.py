"""dataset/synth.py: the demo world."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataset import load_pickle
from dataset.synth import SynthConfig, generate


def _world_items(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """A demo world's (item features by re-id, re-ids in training order, feature-82 rows by re-id)."""
    feats = {int(k): v for k, v in json.loads((path / "item_feat_dict.json").read_text()).items()}
    seen = [r[1] for line in (path / "seq.jsonl").read_text().splitlines() for r in json.loads(line) if r[1]]
    reid = load_pickle(path / "indexer.pkl")["i"]
    rows = {}
    for part in sorted((path / "creative_emb" / "emb_82_16").glob("part-*")):
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            if rec["anonymous_cid"] in reid:
                rows[reid[rec["anonymous_cid"]]] = rec["emb"]
    return feats, np.array(seen), rows


def test_synth_is_deterministic(tmp_path):
    cfg = SynthConfig(users=20, test_users=5, items=50, topics=3, min_len=5, max_len=10, mm=((81, 4),), seed=7)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    for name in ("seq.jsonl", "predict_seq.jsonl", "predict_set.jsonl", "item_feat_dict.json", "labels.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert load_pickle(tmp_path / "a" / "indexer.pkl") == load_pickle(tmp_path / "b" / "indexer.pkl")


def test_synth_content_knobs_name_the_topic_and_the_popularity(tmp_path):
    """topic_share=1: feature 100 groups items of one topic (their feature-82 vectors agree more than at share 0);
    popularity_feature: feature 112 orders items by how often they are picked (noise by default)."""
    base = dict(users=300, test_users=5, items=200, topics=4, min_len=20, max_len=30, mm=((82, 16),), seed=4,
                mm_noise=((82, 0.1),))

    def same_f100_similarity(share: float) -> float:
        feats, _, rows = _world_items(generate(tmp_path / f"t{share}", SynthConfig(**base, topic_share=share)))
        ids = sorted(rows)
        v = np.array([rows[i] for i in ids])
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        f = np.array([feats[i]["100"] for i in ids])
        same = (f[:, None] == f[None]) & ~np.eye(len(ids), dtype=bool)
        return float((v @ v.T)[same].mean())

    assert same_f100_similarity(1.0) > same_f100_similarity(0.0) + 0.2

    def picks_by_f112(oracle: bool) -> np.ndarray:
        feats, seen, _ = _world_items(generate(tmp_path / f"p{oracle}", SynthConfig(**base, popularity_feature=oracle)))
        counts = np.bincount(seen, minlength=max(feats) + 1)
        f112 = np.array([feats[i]["112"] for i in range(1, max(feats) + 1)])
        return np.array([counts[1:][f112 == d].mean() for d in (1, 10)])

    low, high = picks_by_f112(True)
    assert high > 5 * low  # the top decile is picked far more often than the bottom one
    low, high = picks_by_f112(False)
    assert high < 2 * low and low < 2 * high
