"""Generative retrieval: the recommender's generative head decodes the next item's semantic ID code by code, with a
beam constrained to the IDs that exist in the candidate pool; the items behind the beam's IDs (several where IDs
collide) are then ranked by the exact dense score.

    index = PoolIndex(codes, codebook)          # codes: [C, L] int64, 0-based, -1 rows: no ID; built once a run
    ids, logp, invalid = beam_search(head, q, index, width=64)
    cand = index.items(ids)                     # candidate positions behind each beam's IDs

`--retrieval generative` ranks the beam's items by the beam's score (ties, such as a collision, by the dense
score); `hybrid` takes the beam's items plus every item the beam cannot reach (no ID, or never trained on: a
head that learnt to generate the training items' IDs does not generate a new item's) and ranks them by the dense
score.
"""
from __future__ import annotations

import numpy as np
import torch

NEG = float("-inf")


class PoolIndex:
    """The candidate pool's semantic IDs as sorted prefix tables, one per level (an ID prefix of length l + 1 is
    the integer sum of c_j * K^(l - j)): membership of any prefix is one searchsorted."""

    def __init__(self, codes: np.ndarray, codebook: int, unseen: np.ndarray | None = None):
        codes = np.asarray(codes, np.int64)
        self.levels, self.codebook = codes.shape[1], int(codebook)
        has = (codes >= 0).all(1)
        # What hybrid adds to the beam's items: candidates without an ID, and `unseen` ones (never trained on)
        self.unreachable = np.flatnonzero(~has | (np.asarray(unseen, bool) if unseen is not None else False))
        full = np.zeros(len(codes), np.int64)
        self.prefixes: list[torch.Tensor] = []
        for level in range(self.levels):
            full = full * self.codebook + np.where(has, codes[:, level], 0)
            self.prefixes.append(torch.as_tensor(np.unique(full[has])))
        order = np.argsort(full[has], kind="stable")
        self._ids = full[has][order]  # the full ID of each candidate with one, sorted
        self._pos = np.flatnonzero(has)[order]  # ... and its position in the pool

    def valid(self, prefixes: torch.Tensor, level: int) -> torch.Tensor:
        """Whether each prefix (of length level + 1) is one of the pool's."""
        table = self.prefixes[level]
        if not len(table):
            return torch.zeros_like(prefixes, dtype=torch.bool)
        at = torch.searchsorted(table, prefixes).clamp_max(len(table) - 1)
        return table[at] == prefixes

    def items(self, ids: np.ndarray) -> list[np.ndarray]:
        """Pool positions of the candidates behind each full ID (none for an ID outside the pool)."""
        lo = np.searchsorted(self._ids, ids, "left")
        hi = np.searchsorted(self._ids, ids, "right")
        return [self._pos[a:b] for a, b in zip(lo.tolist(), hi.tolist())]


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
        step = torch.log_softmax(head.logits(state, level).float(), -1)  # [B, W, K]
        total = score[..., None] + step
        ext = prefix[..., None] * K + torch.arange(K, device=dev)  # [B, W, K]
        if constrained:
            total = total.masked_fill(~index.valid(ext.flatten().cpu(), level).view(ext.shape).to(dev), NEG)
        score, pick = total.flatten(1).topk(min(width, W * K), -1)
        beam, code = pick // K, pick % K
        prefix = ext.flatten(1).gather(1, pick)
        if level + 1 < index.levels:
            state = head.step(state.gather(1, beam[..., None].expand(-1, -1, state.shape[-1])), level, code)
    ids = torch.where(torch.isfinite(score), prefix, torch.full_like(prefix, -1)).cpu().numpy()
    known = index.valid(torch.as_tensor(ids.reshape(-1)).clamp_min(0), index.levels - 1).numpy().reshape(ids.shape)
    invalid = int(((ids >= 0) & ~known).sum())
    return ids, score.cpu().numpy(), invalid


def generative_top(ids: np.ndarray, index: PoolIndex, query: torch.Tensor, cand: torch.Tensor, k: int,
                   history: np.ndarray, offset: float, hybrid: bool) -> tuple[np.ndarray, int]:
    """One user's top `k` pool positions (-1 where fewer) and how many candidates were scored: the items behind
    the beam's IDs `ids` (in beam order; `hybrid`: plus the pool's unreachable items), ordered by beam rank then by
    the dense score `query . cand[pos]` (`hybrid`: by the dense score alone). `history`: pool positions of the
    user's history items, removed (`offset` -inf) or scored with the model's history offset."""
    groups = index.items(ids[ids >= 0])
    pos = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    rank = np.repeat(np.arange(len(groups)), [len(g) for g in groups]) if groups else np.zeros(0, np.int64)
    if hybrid:
        pos = np.unique(np.concatenate([pos, index.unreachable]))
        rank = np.zeros(len(pos), np.int64)  # the dense score decides
    seen = np.isin(pos, history) if len(history) else np.zeros(len(pos), bool)
    if offset == NEG:  # history filtering: never recommended
        pos, rank, seen = pos[~seen], rank[~seen], seen[~seen]
    if not len(pos):
        return np.full(k, -1, np.int64), 0
    d = (cand[torch.as_tensor(pos, device=cand.device)].float() @ query.float()).cpu().numpy()
    d = d + np.where(seen, offset, 0.0)
    order = np.lexsort((-d, rank))[:k]  # beam rank first, then the dense score
    out = np.full(k, -1, np.int64)
    out[:len(order)] = pos[order]
    return out, len(pos)
