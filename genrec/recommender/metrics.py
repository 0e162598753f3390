"""HitRate@10, NDCG@10 and the competition score (0.31 HR + 0.69 NDCG) of each user's next click or conversion,
a conversion weighing 2.5 times a click."""
from __future__ import annotations

import numpy as np
import torch

from dataset.datasets import CONVERSION

CONVERSION_WEIGHT = 2.5  # the competition's final round counts a conversion target 2.5 times a click


def target_weights(actions: np.ndarray) -> np.ndarray:
    """Each user's weight in the metrics from the target's action (1 click, 2 conversion): 1 or 2.5."""
    return np.where(np.asarray(actions) == CONVERSION, CONVERSION_WEIGHT, 1.0)


def rank_metrics(ranks: np.ndarray, weights: np.ndarray | None = None, k: int = 10) -> dict[str, float]:
    """`ranks`: 1-based rank of each user's target (a value > k, e.g. inf, when it is not in the top k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {"users": 0, "hr@10": 0.0, "ndcg@10": 0.0, "score": 0.0}
    w = np.ones(len(ranks)) if weights is None else np.asarray(weights, np.float64)
    hit = ranks <= k
    ndcg = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 1.0), 0.0)
    hr, nd = float((hit * w).sum() / w.sum()), float((ndcg * w).sum() / w.sum())
    return {"users": int(len(ranks)), "hr@10": hr, "ndcg@10": nd, "score": 0.31 * hr + 0.69 * nd}


def ranks_in_topk(top: list[list[int]], targets: list[int]) -> np.ndarray:
    """1-based position of each target in its top list, inf where absent."""
    out = np.full(len(targets), np.inf)
    for i, (lst, t) in enumerate(zip(top, targets)):
        for r, c in enumerate(lst, 1):
            if c == t:
                out[i] = r
                break
    return out


@torch.no_grad()
def target_ranks(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor, offset: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based rank of each row's target under both rules, from full scores [U, C] (column 0 is padding and never
    ranks), targets [U] and histories [U, L] (column indices, 0-padded). `scores` is modified in place.
    unfiltered: every item, history items with `offset` added (a model's own score for them);
    filtered: history items removed; a target among them is a miss (rank C + 1), as it can never be served."""
    scores[:, 0] = float("-inf")
    t = target[:, None]
    if offset:
        scores.scatter_add_(1, history, torch.full(history.shape, offset, device=scores.device))
    ts = scores.gather(1, t)
    unfiltered = (scores > ts).sum(1) + 1
    scores.scatter_(1, history, float("-inf"))  # padding 0 is already -inf
    filtered = ((scores > ts).sum(1) + 1).masked_fill((history == t).any(1), scores.shape[1] + 1)
    return unfiltered, filtered
