"""Exact top-k by inner product over a candidate matrix, in chunks so memory stays bounded.

Memory: one [user_chunk, item_chunk] score block (16 MiB by default) plus the running top-k, whatever the
pool size.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


_GROUP = 64


def _block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k per row of a score block. Rows are cut into groups of _GROUP columns; only the k groups with
    the largest maxima can hold a top-k entry (every other group has k larger entries elsewhere), so the sort runs
    on k * _GROUP candidates instead of the whole row. A grouped `amax` costs a fraction of `topk` per element."""
    u, c = s.shape
    if c < 4 * k * _GROUP or c % _GROUP:
        return s.topk(min(k, c), dim=1)
    groups = s.view(u, c // _GROUP, _GROUP)
    top_g = groups.amax(2).topk(k, dim=1).indices  # [u, k]
    cand = groups.gather(1, top_g[:, :, None].expand(-1, -1, _GROUP)).reshape(u, k * _GROUP)
    ts, pos = cand.topk(k, dim=1)
    # candidate position -> column: group index * _GROUP + offset inside the group
    return ts, top_g.gather(1, pos // _GROUP) * _GROUP + pos % _GROUP


@torch.no_grad()
def topk_inner_product(queries: torch.Tensor, items: torch.Tensor, k: int = 10,
                       exclude: Sequence[np.ndarray] | None = None, user_chunk: int = 256,
                       item_chunk: int = 16384, offset: float = float("-inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [U, k], item indices [U, k]) of the k best items per query, best first.

    `exclude[u]`: item indices of query u (e.g. items already in the user's history) whose scores get `offset`
    added; -inf (the default): never returned. Fewer than k eligible items -> the tail holds index -1, score -inf."""
    U, C = queries.shape[0], items.shape[0]
    kk = min(k, C)
    out_s = torch.full((U, k), float("-inf"), dtype=torch.float32)
    out_i = torch.full((U, k), -1, dtype=torch.long)
    # One score buffer for every block: a fresh 16 MiB tensor per block costs the CPU page faults that took
    # 40% of the time (the top-k of a block never refers to the block's scores afterwards).
    buf = torch.empty(min(user_chunk, U) * min(item_chunk, C), dtype=torch.result_type(queries, items),
                      device=queries.device)
    for ulo in range(0, U, user_chunk):
        q = queries[ulo:ulo + user_chunk]
        best_s = torch.full((len(q), 0), float("-inf"), device=q.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        for ilo in range(0, C, item_chunk):
            block = items[ilo:ilo + item_chunk]
            s = torch.mm(q, block.T, out=buf[:len(q) * len(block)].view(len(q), len(block)))
            if exclude is not None:
                rows, cols = [], []
                for r, ex in enumerate(exclude[ulo:ulo + len(q)]):
                    sel = ex[(ex >= ilo) & (ex < ilo + s.shape[1])]
                    rows.append(np.full(len(sel), r))
                    cols.append(sel - ilo)
                if rows and sum(len(c) for c in cols):
                    r_, c_ = (torch.as_tensor(np.concatenate(x), device=s.device) for x in (rows, cols))
                    s[r_, c_] = float("-inf") if offset == float("-inf") else s[r_, c_] + offset
            ts, ti = _block_topk(s, kk)
            cat_s, cat_i = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + ilo], 1)
            best_s, pos = cat_s.topk(min(kk, cat_s.shape[1]), dim=1)
            best_i = cat_i.gather(1, pos)
        best_i = torch.where(torch.isinf(best_s), torch.full_like(best_i, -1), best_i)
        out_s[ulo:ulo + len(q), :best_s.shape[1]] = best_s.float().cpu()
        out_i[ulo:ulo + len(q), :best_i.shape[1]] = best_i.cpu()
    return out_s, out_i


def topk_faiss(queries: np.ndarray, items: np.ndarray, k: int = 10,
               exclude: Sequence[np.ndarray] | None = None, offset: float = float("-inf")
               ) -> tuple[np.ndarray, np.ndarray]:
    """The same through faiss.IndexFlatIP (exact): asks for k + max len(exclude[u]) neighbours, which hold the top
    k of the items not excluded; the excluded ones are then dropped (offset -inf) or scored exactly."""
    import faiss  # optional dependency

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, np.float32))
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    s, i = index.search(np.ascontiguousarray(queries, np.float32), min(k + extra, items.shape[0]))
    if exclude is None:
        return s[:, :k], i[:, :k]
    if offset != float("-inf"):
        return _rescore(queries, items, k, exclude, offset, s, i)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for u in range(len(queries)):
        keep = ~np.isin(i[u], exclude[u]) & (i[u] >= 0)
        n = min(k, int(keep.sum()))
        out_s[u, :n], out_i[u, :n] = s[u][keep][:n], i[u][keep][:n]
    return out_s, out_i


def _rescore(queries: np.ndarray, items: np.ndarray, k: int, exclude: Sequence[np.ndarray], offset: float,
             s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top k among the searched neighbours that are not excluded and every excluded item, scored exactly with
    `offset` added."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for u in range(len(queries)):
        ex = np.asarray(exclude[u], np.int64)
        keep = (i[u] >= 0) & ~np.isin(i[u], ex)
        cs = np.concatenate([s[u][keep], items[ex] @ queries[u] + offset])
        ci = np.concatenate([i[u][keep], ex])
        order = np.argsort(-cs, kind="stable")[:k]
        out_s[u, :len(order)], out_i[u, :len(order)] = cs[order], ci[order]
    return out_s, out_i
