"""Benchmark: exact top-10 by inner product, ours (torch matmul + topk in chunks) vs faiss.IndexFlatIP.

    python bench/retrieval.py [--users 10000 --candidates 660000 --dim 64]
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset.cli import FlagParser  # noqa: E402
from evalu.retrieval import topk_inner_product  # noqa: E402


def main() -> None:
    p = FlagParser(description=__doc__)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--candidates", type=int, default=660_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(a.users, a.dim)).astype(np.float32)
    items = rng.normal(size=(a.candidates, a.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    rows = []
    qt, it = torch.from_numpy(q).to(a.device), torch.from_numpy(items).to(a.device)
    t = time.perf_counter()
    s_ours, i_ours = topk_inner_product(qt, it, 10)
    rows.append(("ours (torch, chunked)", time.perf_counter() - t))
    try:
        import faiss

        t = time.perf_counter()
        index = faiss.IndexFlatIP(a.dim)
        index.add(items)
        s_f, i_f = index.search(q, 10)
        rows.append(("faiss IndexFlatIP", time.perf_counter() - t))
        same = (i_ours.numpy() == i_f).mean()
        # where indices differ, the scores must tie (float summation order)
        score_gap = np.abs(s_ours.numpy() - s_f).max()
    except ImportError:
        same, score_gap = None, None
    print(f"# {a.users} users x {a.candidates} candidates, d={a.dim}, {torch.get_num_threads()} threads, {a.device}")
    print("| backend | seconds | vs faiss |")
    print("|---|---|---|")
    fa = next((r[1] for r in rows if r[0].startswith("faiss")), None)
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {fa / secs:.2f}x |" if fa else f"| {name} | {secs:.2f} | - |")
    if same is not None:
        print(f"\nidentical top-10 indices: {100 * same:.3f}% of slots; max score difference {score_gap:.2e}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
