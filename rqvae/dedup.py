"""Make semantic IDs unique where possible: move colliding items to the nearest free last-level code of
their 3-code prefix (the item closest to the shared code keeps it)."""
from __future__ import annotations

import numpy as np


def dedup_codes(codes: np.ndarray, last_residual: np.ndarray, last_codebook: np.ndarray) -> tuple[np.ndarray, dict]:
    """Returns (new codes, {"moved", "unresolved"}). `last_residual` [N, d] is what entered the last level;
    `last_codebook` [K, d] its codewords. Deterministic: ties and order follow item index."""
    codes = codes.copy()
    n, L = codes.shape
    K = last_codebook.shape[0]
    key = np.ascontiguousarray(codes).view(np.dtype((np.void, codes.dtype.itemsize * L))).ravel()
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    dup = counts[inv] > 1
    if not dup.any():
        return codes, {"moved": 0, "unresolved": 0}
    dup_idx = np.flatnonzero(dup)
    own, ranked = _rank_codes(last_residual, dup_idx, codes[dup_idx, L - 1], last_codebook)
    # Within each group, the item closest to the shared code stays; the others move, nearest first.
    order = np.lexsort((own, inv[dup_idx]))
    stays = np.ones(len(dup_idx), bool)
    grp = inv[dup_idx][order]
    stays[order[1:]] = grp[1:] != grp[:-1]
    _, prefix = np.unique(codes[:, :L - 1], axis=0, return_inverse=True)
    prefix = prefix.ravel()
    used: list[set] = [set() for _ in range(int(prefix.max()) + 1)]
    for p, c in zip(prefix.tolist(), codes[:, L - 1].tolist()):
        used[p].add(c)
    moved = unresolved = 0
    for j in np.flatnonzero(~stays)[np.argsort(own[~stays], kind="stable")]:
        i = dup_idx[j]
        taken = used[prefix[i]]
        if len(taken) >= K:
            unresolved += 1
            continue
        for c in ranked[j]:
            if c not in taken:
                codes[i, L - 1] = c
                taken.add(int(c))
                moved += 1
                break
    return codes, {"moved": moved, "unresolved": unresolved}


def _rank_codes(resid: np.ndarray, rows: np.ndarray, own_code: np.ndarray, codebook: np.ndarray,
                chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """For the items `rows`: squared distance to their own code [M], and every code ordered nearest first [M, K].
    In chunks, as |r|^2 - 2 r.c + |c|^2 in float64: never the [M, K, d] difference tensor (30 GB at 1M items)."""
    c = np.asarray(codebook, np.float64)
    c_sq = (c * c).sum(1)
    K = len(c)
    own = np.empty(len(rows), np.float64)
    ranked = np.empty((len(rows), K), np.int16 if K <= np.iinfo(np.int16).max else np.int32)
    for lo in range(0, len(rows), chunk):
        r = np.asarray(resid[rows[lo:lo + chunk]], np.float64)
        d = (r * r).sum(1, keepdims=True) - 2.0 * r @ c.T + c_sq[None, :]
        own[lo:lo + len(r)] = d[np.arange(len(r)), own_code[lo:lo + chunk]]
        ranked[lo:lo + len(r)] = np.argsort(d, axis=1, kind="stable")
    return own, ranked
