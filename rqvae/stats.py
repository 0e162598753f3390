"""Quality figures of a set of semantic IDs: collisions, per-level usage and perplexity."""
from __future__ import annotations

import numpy as np


def collision_stats(codes: np.ndarray) -> dict:
    """collision_rate = 1 - unique IDs / items; largest_group = most items sharing one ID."""
    n = len(codes)
    if n == 0:
        return {"items": 0, "unique_ids": 0, "collision_rate": 0.0, "largest_group": 0}
    _, counts = np.unique(codes, axis=0, return_counts=True)
    sizes, groups = np.unique(counts, return_counts=True)
    return {"items": n, "unique_ids": len(counts), "collision_rate": float(1 - len(counts) / n),
            "largest_group": int(counts.max()),
            # how many IDs are shared by exactly s items, for each s that occurs (s = 1: unique IDs)
            "group_sizes": {str(int(a)): int(b) for a, b in zip(sizes, groups)}}


def level_stats(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: codes used, perplexity (exp of the code distribution's entropy; codebook_size at best) and the
    number of items on each code."""
    out = []
    for lvl in range(codes.shape[1]):
        cnt = np.bincount(codes[:, lvl], minlength=codebook_size).astype(np.float64)
        p = cnt[cnt > 0] / max(cnt.sum(), 1)
        out.append({"level": lvl, "used": int((cnt > 0).sum()), "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                    "items_per_code": cnt.astype(np.int64).tolist()})
    return out
