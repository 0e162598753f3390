"""Benchmark: exact top-10 by inner product, ours (torch matmul + topk in chunks) vs faiss.IndexFlatIP (its
time includes `add`), the same thread count for both, run alternately `--repeat` times (this machine is a VM with
noisy neighbours: the median and the best of each are shown).

    python bench/retrieval.py [--users 10000 --candidates 660000 --dim 64 --threads 2 --repeat 3]
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
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(a.users, a.dim)).astype(np.float32)
    items = rng.normal(size=(a.candidates, a.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    qt, it = torch.from_numpy(q).to(a.device), torch.from_numpy(items).to(a.device)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        faiss = None
    times: dict[str, list[float]] = {"ours (torch, chunked)": [], "faiss IndexFlatIP (add + search)": []}
    same = score_gap = None
    for _ in range(a.repeat):
        t = time.perf_counter()
        s_ours, i_ours = topk_inner_product(qt, it, 10)
        times["ours (torch, chunked)"].append(time.perf_counter() - t)
        if faiss is not None:
            t = time.perf_counter()
            index = faiss.IndexFlatIP(a.dim)
            index.add(items)
            s_f, i_f = index.search(q, 10)
            times["faiss IndexFlatIP (add + search)"].append(time.perf_counter() - t)
            same = (i_ours.numpy() == i_f).mean()
            score_gap = np.abs(s_ours.numpy() - s_f).max()  # where indices differ, the scores must tie
    print(f"# {a.users} users x {a.candidates} candidates, d={a.dim}, {threads} threads for both, {a.device}, "
          f"{a.repeat} alternating runs")
    print("| backend | median s | best s | median vs faiss |")
    print("|---|---|---|---|")
    fa = float(np.median(times["faiss IndexFlatIP (add + search)"])) if faiss is not None else None
    for name, ts in times.items():
        if ts:
            med = float(np.median(ts))
            print(f"| {name} | {med:.2f} | {min(ts):.2f} | {f'{fa / med:.2f}x' if fa else '-'} |")
    if same is not None:
        print(f"\nidentical top-10 indices: {100 * same:.3f}% of slots; max score difference {score_gap:.2e}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
