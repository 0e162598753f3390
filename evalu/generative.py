"""Generative retrieval: the recommender's generative head decodes the next item's semantic ID code by code, with a
beam constrained to the IDs that exist in the candidate pool; the items behind the beam's IDs (several where IDs
collide) are then ranked by the exact dense score.

    index = PoolIndex(codes, codebook)          # codes: [C, L] int64, 0-based, -1 rows: no ID; built once a run
    ids, logp, invalid = beam_search(head, q, index, width=64)
    top, scored = generative_topk(ids, index, q, cand, 10, history, offset, hybrid)

`--retrieval generative` ranks the beam's items by the beam's score (ties, such as a collision, by the dense
score); `hybrid` takes the beam's items plus every item the beam cannot reach (no ID, or never trained on: a
head that learnt to generate the training items' IDs does not generate a new item's) and ranks them by the dense
score.
"""
from __future__ import annotations

import numpy as np
import torch

from evalu.retrieval import topk_scored

NEG = float("-inf")


class PoolIndex:
    """The candidate pool's semantic IDs as sorted prefix tables, one per level (an ID prefix of length l + 1 is
    the integer sum of c_j * K^(l - j)): membership of any prefix is one searchsorted."""

    FLAG_LIMIT = 1 << 25  # 32 MiB of flags: with 256 codes, the children of 1- and 2-code prefixes (3: 4 GiB)

    def __init__(self, codes: np.ndarray, codebook: int, unseen: np.ndarray | None = None):
        codes = np.asarray(codes, np.int64)
        self.levels, self.codebook = codes.shape[1], int(codebook)
        has = (codes >= 0).all(1)
        # What hybrid adds to the beam's items: candidates without an ID, and `unseen` ones (never trained on)
        self.unreachable_mask = ~has | (np.asarray(unseen, bool) if unseen is not None else False)
        self.unreachable = np.flatnonzero(self.unreachable_mask)
        full = np.zeros(len(codes), np.int64)
        for level in range(self.levels):
            full = full * self.codebook + np.where(has, codes[:, level], 0)
        order = np.argsort(full[has])  # one sort: every level's prefixes of the sorted IDs are sorted too
        self._ids = full[has][order]  # the full ID of each candidate with one, sorted
        self._pos = np.flatnonzero(has)[order]  # ... and its position in the pool
        self.prefixes: list[torch.Tensor] = []
        for level in range(self.levels):
            p = self._ids // self.codebook ** (self.levels - 1 - level)
            self.prefixes.append(torch.as_tensor(p[np.r_[True, p[1:] != p[:-1]]] if len(p) else p))
        # Levels whose prefixes fit a table of at most FLAG_LIMIT flags: each prefix's children are one row of it
        self._rows = [self._flags(level) if self.codebook ** (level + 2) <= self.FLAG_LIMIT else None
                      for level in range(self.levels - 1)]

    def _flags(self, level: int) -> torch.Tensor:
        """[K^(level + 1), K] bool: whether prefix p (of length level + 1) extended by code c is one of the pool's."""
        flags = torch.zeros(self.codebook ** (level + 2), dtype=torch.bool)
        flags[self.prefixes[level + 1]] = True
        return flags.view(-1, self.codebook)

    def children(self, prefixes: torch.Tensor, level: int) -> torch.Tensor:
        """Which codes extend each prefix [...] (of length level + 1) to one of the pool's: bool [..., codebook].
        A row of the level's flag table, or where that would be too large two searchsorted per prefix (its
        children are one run of the next table), not one per extension."""
        if self._rows[level] is not None:
            return self._rows[level][prefixes]
        K, table = self.codebook, self.prefixes[level + 1]
        base = prefixes.reshape(-1) * K
        lo, hi = torch.searchsorted(table, base), torch.searchsorted(table, base + K)
        n = hi - lo
        row = torch.repeat_interleave(torch.arange(len(base)), n)
        at = torch.arange(int(n.sum())) + torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)
        mask = torch.zeros(len(base) * K, dtype=torch.bool)
        mask[row * K + table[at] - base[row]] = True
        return mask.view(*prefixes.shape, K)

    def valid(self, prefixes: torch.Tensor, level: int) -> torch.Tensor:
        """Whether each prefix (of length level + 1) is one of the pool's."""
        table = self.prefixes[level]
        if not len(table):
            return torch.zeros_like(prefixes, dtype=torch.bool)
        at = torch.searchsorted(table, prefixes).clamp_max(len(table) - 1)
        return table[at] == prefixes


@torch.no_grad()
def beam_search(head: torch.nn.Module, q: torch.Tensor, index: PoolIndex, width: int,
                constrained: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """The `width` most likely full IDs per query [B, h] under the head, each a prefix of the pool's at every
    level when `constrained`: (ids [B, W] int64 with -1 where fewer exist, summed log-probabilities [B, W],
    how many returned IDs are not in the pool: 0 when constrained)."""
    K = index.codebook
    dev = q.device
    logp = torch.log_softmax(head.logits(q, 0).float(), -1)  # [B, K]
    if constrained:
        logp = logp.masked_fill(~index.valid(torch.arange(K), 0)[None, :].to(dev), NEG)
    score, code = logp.topk(min(width, K), -1)  # [B, W]
    prefix, state = code, head.step(q[:, None, :].expand(-1, code.shape[1], -1), 0, code) \
        if index.levels > 1 else q
    for level in range(1, index.levels):
        W = prefix.shape[1]
        total = torch.log_softmax(head.logits(state, level).float(), -1).add_(score[..., None])  # [B, W, K]
        if constrained:
            total.masked_fill_(~index.children(prefix.cpu(), level - 1).to(dev), NEG)
        score, pick = total.flatten(1).topk(min(width, W * K), -1)
        beam, code = pick // K, pick % K
        prefix = prefix.gather(1, beam) * K + code
        if level + 1 < index.levels:
            state = head.step(state.gather(1, beam[..., None].expand(-1, -1, state.shape[-1])), level, code)
    ids = torch.where(torch.isfinite(score), prefix, torch.full_like(prefix, -1)).cpu().numpy()
    known = index.valid(torch.as_tensor(ids.reshape(-1)).clamp_min(0), index.levels - 1).numpy().reshape(ids.shape)
    invalid = int(((ids >= 0) & ~known).sum())
    return ids, score.cpu().numpy(), invalid


def generative_topk(ids: np.ndarray, index: PoolIndex, queries: torch.Tensor, cand: torch.Tensor, k: int,
                    exclude: list[np.ndarray] | None, offset: float, hybrid: bool,
                    unreachable_vectors: torch.Tensor | None = None, score_dtype: str = "float32",
                    budget: int = 1 << 18) -> tuple[np.ndarray, int]:
    """Each query's top `k` pool positions [B, k] (-1 where fewer) and how many (user, candidate) pairs were
    scored. The candidates are the items behind the beam's IDs `ids` [B, W] (several where IDs collide), ordered
    by beam rank then by the dense score `query . cand[pos]`; `hybrid`: plus the pool's unreachable items, all
    ordered by the dense score alone. `exclude[u]`: pool positions of user u's history, never returned (`offset`
    -inf) or scored with the model's history offset.

    Vectorised over the batch: the (user, item) pairs behind the beam are laid out flat, at most `budget` at a
    time (a gather of `budget` candidate vectors), and the unreachable items are one exact dense top-k
    (`evalu.retrieval.topk_scored` in `score_dtype`) over `unreachable_vectors`, `cand[index.unreachable]`: pass
    them when calling batch after batch, so that they are gathered once."""
    B = len(ids)
    out = np.full((B, k), -1, np.int64)
    best = np.full((B, k), NEG, np.float64)
    user, rank = np.nonzero(ids >= 0)  # row-major: user by user, in beam order
    lo = np.searchsorted(index._ids, ids[user, rank], "left")
    n = np.searchsorted(index._ids, ids[user, rank], "right") - lo
    if hybrid:
        rank = np.zeros_like(rank)  # the dense score decides
    hist = exclude if exclude is not None and offset != 0 else None
    per_user = np.bincount(user, weights=n, minlength=B).astype(np.int64)
    scored, b0 = 0, 0
    while b0 < B:  # users [b0, b1) whose pairs fit the budget (at least one user)
        b1 = max(b0 + 1, int(np.searchsorted(np.cumsum(per_user[b0:]), budget, "right")) + b0)
        sel = slice(*np.searchsorted(user, [b0, b1]))
        scored += _beam_block(index, queries, cand, k, user[sel], rank[sel], lo[sel], n[sel], hist, offset, hybrid,
                              out, best)
        b0 = b1
    if hybrid and len(index.unreachable):
        u_items = index.unreachable
        u_hist = None
        if hist is not None:  # history positions -> positions among the unreachable items
            u_hist = []
            for h in hist:
                at = np.searchsorted(u_items, h).clip(max=len(u_items) - 1)
                u_hist.append(at[u_items[at] == h])
        if unreachable_vectors is None:
            unreachable_vectors = cand[torch.as_tensor(u_items, device=cand.device)]
        s, i, _ = topk_scored(queries, unreachable_vectors, k, u_hist, offset, score_dtype)
        s, i = s.numpy().astype(np.float64), i.numpy()
        pos = np.where(i >= 0, u_items[i.clip(min=0)], -1)
        both_s, both_p = np.concatenate([best, s], 1), np.concatenate([out, pos], 1)
        top = np.argsort(-both_s, 1, kind="stable")[:, :k]
        best, out = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_p, top, 1)
        out[~np.isfinite(best)] = -1
        scored += B * len(u_items)
    return out, scored


def _beam_block(index: PoolIndex, queries: torch.Tensor, cand: torch.Tensor, k: int, user: np.ndarray,
                rank: np.ndarray, lo: np.ndarray, n: np.ndarray, hist: list[np.ndarray] | None, offset: float,
                hybrid: bool, out: np.ndarray, best: np.ndarray) -> int:
    """`generative_topk` for one block of (user, beam ID) pairs: expands each ID to its items, scores them and
    writes each user's top k into `out` / `best`. Returns how many pairs it scored."""
    total = int(n.sum())
    if not total:
        return 0
    start = np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(total)  # ID i's items: _pos[lo_i : lo_i + n_i]
    pos, u, r = index._pos[start], np.repeat(user, n), np.repeat(rank, n)
    if hybrid:  # the unreachable items are scored apart, once
        keep = ~index.unreachable_mask[pos]
        pos, u, r = pos[keep], u[keep], r[keep]
    dev = cand.device
    d = (cand[torch.as_tensor(pos, device=dev)].float()
         * queries[torch.as_tensor(u, device=dev)].float()).sum(1).cpu().numpy().astype(np.float64)
    if hist is not None:
        C = len(index.unreachable_mask)
        users = np.unique(u)
        keys = np.concatenate([b * C + hist[b] for b in users.tolist()] or [np.zeros(0, np.int64)])
        seen = np.isin(u * C + pos, keys)
        d[seen] += offset  # -inf: never returned
    scored, live = len(d), np.isfinite(d)
    pos, u, r, d = pos[live], u[live], r[live], d[live]
    order = np.lexsort((-d, r, u))  # by user, then beam rank, then the dense score
    pos, u, d = pos[order], u[order], d[order]
    place = np.arange(len(u)) - np.searchsorted(u, u, "left")  # rank within the user's list
    top = place < k
    out[u[top], place[top]] = pos[top]
    best[u[top], place[top]] = d[top]
    return scored
