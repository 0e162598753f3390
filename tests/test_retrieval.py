"""evalu/retrieval.py: exact top-10 (chunked, low-precision shortlist, history offset, faiss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evalu.retrieval import topk_faiss, topk_inner_product, topk_shortlist


def _assert_same_top(s, i, ref_s, ref_i, tol=1e-6):
    """The same scores, and the same items wherever scores differ by more than fp32 rounding (two fp32 kernels
    may order items within an ulp of each other differently)."""
    assert torch.allclose(s, ref_s, atol=tol, rtol=0)
    for u in range(len(s)):
        tied = (ref_s[u][:, None] - ref_s[u][None, :]).abs() < tol
        for p in (i[u] != ref_i[u]).nonzero()[:, 0].tolist():
            assert i[u, p].item() in ref_i[u][tied[p]].tolist()


def test_chunked_retrieval_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, items = torch.randn(37, 8, generator=g), torch.randn(1000, 8, generator=g)
    s, i = topk_inner_product(q, items, 10, user_chunk=7, item_chunk=64)
    ref = (q @ items.T).topk(10, dim=1)
    assert torch.equal(i, ref.indices) and torch.allclose(s, ref.values)
    ex = [np.asarray(ref.indices[u, :3]) for u in range(37)]
    _, i2 = topk_inner_product(q, items, 10, exclude=ex, item_chunk=100)
    assert torch.equal(i2[:, :7], ref.indices[:, 3:])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("offset", [-0.7, 0.4])
def test_history_offset_retrieval_equals_brute_force(backend, offset):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    q, items = torch.randn(40, 8, generator=g), torch.randn(500, 8, generator=g)
    ex = [np.unique(np.asarray(torch.randint(0, 500, (30,), generator=g))) for _ in range(40)]
    full = q @ items.T
    for u in range(40):
        full[u, ex[u]] += offset
    ref = full.topk(10, dim=1)
    if backend == "faiss":
        s, i = topk_faiss(q.numpy(), items.numpy(), 10, ex, offset)
        s, i = torch.as_tensor(s), torch.as_tensor(i)
    else:
        s, i = topk_inner_product(q, items, 10, exclude=ex, offset=offset, item_chunk=128)
    assert torch.equal(i, ref.indices) and torch.allclose(s, ref.values, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [float("-inf"), -0.3, 0.4, None])
def test_low_precision_shortlist_returns_the_float32_top10(dtype, offset):
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(300, 24, generator=g), dim=1)
    items = F.normalize(torch.randn(5000, 24, generator=g), dim=1)
    ex = None if offset is None else [np.asarray(torch.randint(0, 5000, (40,), generator=g)) for _ in range(300)]
    off = float("-inf") if offset is None else offset
    ref_s, ref_i = topk_inner_product(q, items, 10, ex, offset=off)
    stats = {}
    s, i = topk_shortlist(q, items, 10, ex, off, dtype, groups=16, group=8, item_chunk=1024, stats=stats)
    _assert_same_top(s, i, ref_s, ref_i)
    assert stats["users"] == 300 and stats["fallback_users"] < 300  # the shortlist proved most users


@pytest.mark.parametrize("tied", [200, 3000])
def test_low_precision_shortlist_falls_back_where_rounding_hides_the_winner(tied):
    """`tied` items tie with the true best in bf16 (their first coordinates round to the same value): 16 groups of
    8 cannot tell them apart and the proof fails; 128 groups hold all of 200 (second pass), not all of 3000 (those
    users are scored again in fp32). The answer is the fp32 one every time."""
    q = torch.zeros(5, 8)
    q[:, 0] = 1.0
    items = torch.zeros(tied + 100, 8)
    items[:, 1] = torch.linspace(-1, 1, len(items))  # no contribution to the score: q is zero there
    items[:tied, 0] = 0.5 + 0.0005 * torch.rand(tied, generator=torch.Generator().manual_seed(0))
    items[137, 0] = 0.5016  # best exactly, the same bf16 value as the others (spacing 2^-8 at 0.5)
    assert len(set(items[:tied, 0].bfloat16().tolist())) == 1
    ref_s, ref_i = topk_inner_product(q, items, 10)
    assert (ref_i[:, 0] == 137).all()
    stats = {}
    s, i = topk_shortlist(q, items, 10, dtype=torch.bfloat16, groups=16, group=8, stats=stats)
    assert torch.equal(i, ref_i) and torch.equal(s, ref_s)
    assert stats["second_pass_users"] == 5 and stats["fallback_users"] == (5 if tied > 16 * 8 * 8 else 0)


def test_low_precision_shortlist_edges():
    g = torch.Generator().manual_seed(4)
    q, items = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)  # fewer items than k
    ref_s, ref_i = topk_inner_product(q, items, 10)
    s, i = topk_shortlist(q, items, 10)
    assert torch.equal(i, ref_i) and (i[:, 6:] == -1).all() and torch.isinf(s[:, 6:]).all()
    ex = [np.arange(6), np.array([0, 0, 2]), np.array([], np.int64)]  # all excluded / duplicates / none
    for off in (float("-inf"), 0.5):
        ref_s, ref_i = topk_inner_product(q, items, 10, ex, offset=off)
        s, i = topk_shortlist(q, items, 10, ex, off)
        _assert_same_top(s, i, ref_s, ref_i)
    s, i = topk_shortlist(q[:0], items, 10)
    assert s.shape == (0, 10)
    big = torch.full((2, 8), 300.0)  # |q| |v| beyond fp16's range: scored in bf16 instead of inf
    s, i = topk_shortlist(big, torch.cat([big, -big]), 1, dtype=torch.float16)
    assert torch.isfinite(s).all() and (i[:, 0] < 2).all()


def test_grouped_block_topk_matches_plain_topk_with_ties_and_exclusions():
    from evalu.retrieval import _block_topk

    g = torch.Generator().manual_seed(1)
    s = torch.randn(50, 4096, generator=g).round(decimals=1)  # many ties
    s[3] = float("-inf")
    s[4, :100] = 10.0
    vals, idx = _block_topk(s.clone(), 10)
    ref = s.topk(10, dim=1).values
    assert torch.equal(vals, ref)
    assert torch.equal(s.gather(1, idx), vals)  # the indices point at those values
    q, items = torch.randn(300, 16, generator=g), torch.randn(20000, 16, generator=g)
    ex = [np.arange(u, 20000, 97) for u in range(300)]
    sc, ix = topk_inner_product(q, items, 10, exclude=ex)
    full = q @ items.T
    for u in range(300):
        full[u, ex[u]] = float("-inf")
    ref = full.topk(10, dim=1)
    assert torch.allclose(sc, ref.values) and torch.equal(ix, ref.indices)
