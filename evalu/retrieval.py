"""Exact top-k by inner product over a candidate matrix, in chunks so memory stays bounded.

Memory: one [user_chunk, item_chunk] score block (16 MiB by default) plus the running top-k, whatever the
pool size. `topk_shortlist` scores in bf16 (or fp16) first and rescores a shortlist in fp32: the same top-k,
proven per user by an error bound, in a fraction of the time where the hardware multiplies bf16 natively.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def _score_blocks(queries: torch.Tensor, items: torch.Tensor, user_chunk: int, item_chunk: int,
                  exclude: Sequence[np.ndarray] | None, offset: float
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(ulo, ilo, scores of queries[ulo:] x items[ilo:] block), user chunk by user chunk, items in order; the
    excluded items' scores -inf, or + `offset` when finite. Every block lives in one buffer, valid until the next:
    a fresh 16 MiB tensor per block costs the CPU page faults that took 40% of the time."""
    U, C = queries.shape[0], items.shape[0]
    buf = torch.empty(min(user_chunk, U) * min(item_chunk, C), dtype=torch.result_type(queries, items),
                      device=queries.device)
    for ulo in range(0, U, user_chunk):
        q = queries[ulo:ulo + user_chunk]
        for ilo in range(0, C, item_chunk):
            block = items[ilo:ilo + item_chunk]
            s = torch.mm(q, block.T, out=buf[:len(q) * len(block)].view(len(q), len(block)))
            if exclude is not None:
                rows, cols = [], []
                for r, ex in enumerate(exclude[ulo:ulo + len(q)]):
                    sel = ex[(ex >= ilo) & (ex < ilo + len(block))]
                    rows.append(np.full(len(sel), r))
                    cols.append(sel - ilo)
                if rows and sum(len(c) for c in cols):
                    r_, c_ = (torch.as_tensor(np.concatenate(x), device=s.device) for x in (rows, cols))
                    s[r_, c_] = float("-inf") if offset == float("-inf") else s[r_, c_] + offset
            yield ulo, ilo, s


def _keep_top(best: tuple[torch.Tensor, torch.Tensor] | None, vals: torch.Tensor, idx: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of the running best (None before a chunk's first block) and a block's candidates: (values,
    indices) per row, best first."""
    if best is not None:
        vals, idx = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1)
    top, pos = vals.topk(min(k, vals.shape[1]), dim=1)
    return top, idx.gather(1, pos)


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
    best = None
    for ulo, ilo, s in _score_blocks(queries, items, user_chunk, item_chunk, exclude, offset):
        ts, ti = _block_topk(s, kk)
        best = _keep_top(best if ilo else None, ts, ti + ilo, kk)  # ilo 0: a new chunk of users
        if ilo + s.shape[1] >= C:  # the chunk's last block
            best_s, best_i = best
            best_i = torch.where(torch.isinf(best_s), torch.full_like(best_i, -1), best_i)
            out_s[ulo:ulo + len(s), :best_s.shape[1]] = best_s.float().cpu()
            out_i[ulo:ulo + len(s), :best_i.shape[1]] = best_i.cpu()
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


SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of rounding to `dtype` (round to nearest): 2^-(mantissa bits + 1)."""
    return float(torch.finfo(dtype).eps) / 2


@contextlib.contextmanager
def _fp32_accumulation() -> Iterator[None]:
    """The bound assumes fp32 accumulation: turn off CUDA's reduced-precision split-K reductions meanwhile."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): then a bf16 product is 2-4x an fp32 one;
    without it torch emulates bf16 and the shortlist would cost more than it saves."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_score_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs that multiply bf16 natively (1.6x our fp32 path on an AVX512-BF16 CPU,
    bench/retrieval.py); fp32 elsewhere (emulated bf16 would cost more than it saves)."""
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else torch.float32


def _padded(exclude: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Ragged index lists -> [n, longest] long tensor, -1 where a list is shorter."""
    width = max((len(e) for e in exclude), default=0)
    out = np.full((len(exclude), width), -1, np.int64)
    for r, e in enumerate(exclude):
        e = np.unique(e)  # a history may hold an item twice; it is one candidate
        out[r, :len(e)] = e
    return torch.as_tensor(out, device=device)


def _group_maxima(queries: torch.Tensor, items: torch.Tensor, groups: int, group: int,
                  exclude: Sequence[np.ndarray] | None, user_chunk: int, item_chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the `groups` best groups of `group` items by their best score (excluded items left out):
    (maxima [U, groups] fp32 descending, -inf past the last group; group ids [U, groups], see `_group_members`).

    A block of W * group items holds W groups, group j being items j, j + W, j + 2W, ...: the group maxima are
    an elementwise max of `group` contiguous rows of W scores, which vectorises, in bf16 too (a max over short
    inner runs does not)."""
    U, C = queries.shape[0], items.shape[0]
    item_chunk = max(group, item_chunk // group * group)  # blocks hold whole groups
    t = min(groups, -(-C // group))
    out_m = torch.full((U, groups), float("-inf"))
    out_g = torch.zeros((U, groups), dtype=torch.long)
    best = None
    for ulo, ilo, s in _score_blocks(queries, items, user_chunk, item_chunk, exclude, float("-inf")):
        n, width = s.shape
        w = -(-width // group)
        if width < w * group:  # the last block: padded to whole groups
            s = torch.cat([s, s.new_full((n, w * group - width), float("-inf"))], 1)
        # [n, w]: group j = items ilo + j + w * (0 .. group - 1); a max over the middle axis runs at memory
        # speed in bf16 too (over the last axis it does not)
        gm = s.view(n, group, w).amax(1).float()
        bm, bg = gm.topk(min(t, w), dim=1)
        best = _keep_top(best if ilo else None, bm, bg + ilo, t)  # ilo 0: a new chunk of users
        if ilo + width >= C:
            out_m[ulo:ulo + n, :t], out_g[ulo:ulo + n, :t] = best[0].cpu(), best[1].cpu()
    return out_m, out_g


def _group_members(gid: torch.Tensor, n_items: int, group: int, item_chunk: int) -> torch.Tensor:
    """Group ids [n, T] of `_group_maxima` -> item indices [n, T * group] (>= n_items: padding)."""
    item_chunk = max(group, item_chunk // group * group)
    start = gid // item_chunk * item_chunk  # first item of the group's block
    w = torch.where(start + item_chunk <= n_items, item_chunk // group, -(-(n_items - start) // group))
    return (gid[:, :, None] + w[:, :, None] * torch.arange(group, device=gid.device)).flatten(1)


def _prove(queries: torch.Tensor, items: torch.Tensor, g_max: torch.Tensor, g_id: torch.Tensor, k: int,
           exclude: Sequence[np.ndarray] | None, offset: float, group: int, item_chunk: int, u: float,
           e_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rescore every item of each query's kept groups (and its excluded items when `offset` is finite) in fp32:
    (top-k scores, indices, proven [U] bool: no item outside the groups can beat the k-th, see topk_shortlist)."""
    U, C, d = queries.shape[0], items.shape[0], items.shape[1]
    T, dev = g_id.shape[1], queries.device
    out_s = torch.empty((U, k))
    out_i = torch.empty((U, k), dtype=torch.long)
    proven = torch.empty(U, dtype=torch.bool)
    step = max(1, (1 << 22) // (T * group * d))  # users per chunk: ~16 MiB of gathered rows
    for lo in range(0, U, step):
        hi = min(lo + step, U)
        ids = _group_members(g_id[lo:hi].to(dev), C, group, item_chunk)  # [n, T * group]
        dead = (ids >= C) | (g_max[lo:hi].to(dev) == float("-inf")).repeat_interleave(group, 1)
        n_kept = ids.shape[1]
        if exclude is not None:  # excluded items inside the groups: out here, back below with their offset
            ex = _padded(exclude[lo:hi], dev)
            if ex.shape[1]:
                dead |= (ids[:, :, None] == ex[:, None, :]).any(2)
            if offset != float("-inf"):
                ids, dead = torch.cat([ids, ex], 1), torch.cat([dead, ex < 0], 1)
        rows = items.index_select(0, ids.clamp(0, C - 1).flatten()).view(*ids.shape, d)  # 10x items[ids]
        s = torch.bmm(rows, queries[lo:hi, :, None])[..., 0]
        s[:, n_kept:] += offset
        ts, pos = s.masked_fill(dead, float("-inf")).topk(k, dim=1)
        # m: the last kept group's max; -inf when the kept groups hold every eligible item. An item outside
        # scored ŝ <= m, ŝ = the fp32 sum a rounded once: a <= m / (1 -+ u); its exact score is within e_in of a.
        m = g_max[lo:hi, T - 1].to(dev)
        bound = torch.maximum(m / (1 - u), m / (1 + u)) + e_in[lo:hi] + 1e-30
        proven[lo:hi] = ((m == float("-inf")) | (ts[:, -1] > bound)).cpu()
        out_s[lo:hi], out_i[lo:hi] = ts.cpu(), torch.where(torch.isinf(ts), -1, ids.gather(1, pos)).cpu()
    return out_s, out_i, proven


@torch.no_grad()
def topk_shortlist(queries: torch.Tensor, items: torch.Tensor, k: int = 10,
                   exclude: Sequence[np.ndarray] | None = None, offset: float = float("-inf"),
                   dtype: torch.dtype = torch.bfloat16, groups: int = 24, group: int = 32, user_chunk: int = 256,
                   item_chunk: int = 16384, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_inner_product`'s answer, scored in `dtype` first.

    1. In `dtype`, the `groups` best groups of `group` items per user, by their best item (excluded items left
       out): a group max and a small top-k per block is all the selection this pass does.
    2. Every item of those groups, and the user's excluded items when `offset` is finite, rescored in fp32; the
       top k of them.
    3. Proof per user: an item outside those groups scored at most m (the last group's max) in `dtype`; its exact
       score is at most m undone by one rounding to `dtype`, plus the measured rounding of the inputs
       (|q~ - q| max|v~| + |q| max|v~ - v|) and fp32 accumulation (Higham's gamma_d, for the low-precision sum
       and twice for fp32's own). Users not proven go through 1-3 again with 8x the groups
       (`stats["second_pass_users"]`), and those still not proven are scored in fp32 (`stats["fallback_users"]`):
       the answer is the fp32 one whatever the data (items whose fp32 scores differ by rounding alone, ~1e-7,
       may swap places, as they do between two fp32 kernels). Assumes fp32 accumulation: torch's on CPU; on CUDA
       reduced-precision reductions are off meanwhile."""
    U, C, d = queries.shape[0], items.shape[0], items.shape[1]
    queries, items = queries.float(), items.float()
    if dtype == torch.float16 and U and C and float(queries.norm(dim=1).max() * items.norm(dim=1).max()) > 3e4:
        dtype = torch.bfloat16  # fp16 would overflow to inf; bf16 has fp32's range
    out_s = torch.full((U, k), float("-inf"), dtype=torch.float32)
    out_i = torch.full((U, k), -1, dtype=torch.long)
    if U == 0 or C == 0:
        return out_s, out_i
    kk = min(k, C)
    q_lp, items_lp = queries.to(dtype), items.to(dtype)
    # Error terms of a low-precision score, measured, not assumed: the inputs' rounding |q~ - q|, max|v~ - v|
    # (over chunks of items: no second full-size copy).
    v0 = v1 = v2 = 0.0
    for lo in range(0, C, 1 << 16):
        v, v_lp = items[lo:lo + (1 << 16)], items_lp[lo:lo + (1 << 16)].float()
        v0, v1 = max(v0, float(v.norm(dim=1).max())), max(v1, float(v_lp.norm(dim=1).max()))
        v2 = max(v2, float((v_lp - v).norm(dim=1).max()))
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    qn, q_lpn = queries.norm(dim=1), q_lp.float().norm(dim=1)
    e_in = (q_lp.float() - queries).norm(dim=1) * v1 + qn * v2 + gamma * (q_lpn * v1 + 2 * qn * v0)
    rows = torch.arange(U)
    passes = []
    for t in (max(groups, k), 8 * max(groups, k)):
        if not len(rows):
            break
        passes.append(len(rows))
        dev_rows = rows.to(queries.device)
        ex = [exclude[r] for r in rows.tolist()] if exclude is not None else None
        with _fp32_accumulation():
            g_max, g_id = _group_maxima(q_lp[dev_rows], items_lp, t, group, ex, user_chunk, item_chunk)
        ts, ti, ok = _prove(queries[dev_rows], items, g_max, g_id, kk, ex, offset, group, item_chunk,
                            unit_roundoff(dtype), e_in[dev_rows])
        out_s[rows[ok], :kk], out_i[rows[ok], :kk] = ts[ok], ti[ok]
        rows = rows[~ok]
    del items_lp
    if len(rows):
        ex = [exclude[r] for r in rows.tolist()] if exclude is not None else None
        out_s[rows], out_i[rows] = topk_inner_product(queries[rows.to(queries.device)], items, k, ex, user_chunk,
                                                      item_chunk, offset)
    if stats is not None:
        stats["users"] = stats.get("users", 0) + U
        stats["second_pass_users"] = stats.get("second_pass_users", 0) + (passes[1] if len(passes) > 1 else 0)
        stats["fallback_users"] = stats.get("fallback_users", 0) + len(rows)
    return out_s, out_i


def topk_scored(queries: torch.Tensor, items: torch.Tensor, k: int = 10,
                exclude: Sequence[np.ndarray] | None = None, offset: float = float("-inf"),
                score_dtype: str = "auto", user_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The exact top k as `--score_dtype` asks: "auto" (see auto_score_dtype), "float32" (topk_inner_product) or a
    low precision (topk_shortlist). Returns (scores, indices, how: score_dtype and, below fp32, the users that
    were rescored in fp32 throughout)."""
    dtype = auto_score_dtype(queries.device) if score_dtype == "auto" else SCORE_DTYPES[score_dtype]
    how: dict[str, Any] = {"score_dtype": str(dtype).removeprefix("torch.")}
    if dtype == torch.float32:
        s, i = topk_inner_product(queries, items, k, exclude, user_chunk=user_chunk, offset=offset)
    else:
        stats: dict[str, int] = {}
        s, i = topk_shortlist(queries, items, k, exclude, offset, dtype, user_chunk=user_chunk, stats=stats)
        how["rescored_in_float32"] = stats.get("fallback_users", 0)
    return s, i, how
