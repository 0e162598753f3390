"""genrec/recommender/metrics.py: HR@10, NDCG@10 and the weighted score."""
from __future__ import annotations

import numpy as np
import pytest


def test_rank_metrics_against_hand_computed_values():
    import math

    from genrec.recommender.metrics import rank_metrics

    m = rank_metrics(np.array([1, 2, 3, 10, 11, np.inf]))
    hr = 4 / 6
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(11)) / 6
    assert m["users"] == 6 and m["hr@10"] == pytest.approx(hr) and m["ndcg@10"] == pytest.approx(ndcg)
    assert m["score"] == pytest.approx(0.31 * hr + 0.69 * ndcg)
    w = rank_metrics(np.array([1, np.inf]), weights=np.array([2.5, 1.0]))  # a conversion weighs 2.5
    assert w["hr@10"] == pytest.approx(2.5 / 3.5) and w["ndcg@10"] == pytest.approx(2.5 / 3.5)
