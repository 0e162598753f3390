"""glibc's allocator set for batch-sized tensors. By default glibc maps each block above a (moving) threshold of at
most 32 MiB afresh and hands memory back to the system as soon as the top of the heap is free, so every batch
of a big job pays its page faults again (the first load of 1M x 32 embeddings: 2.13 s with glibc's defaults,
1.57 s tuned, bench/results/load_mm_emb.md). The entry points (infer, train.py, train_rqvae.py) keep blocks up
to 256 MiB in the heap and trim it only past 1 GiB free (in that load: 71 vs 69 MiB peak over the interpreter). GENREC_NO_MALLOC_TUNING=1 leaves the allocator as
it is."""
from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 256 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
_tuned = False


def tune_allocator() -> bool:
    """Apply the settings once per process; whether they are in force (False off glibc, e.g. on macOS, or when
    GENREC_NO_MALLOC_TUNING=1). Never raises."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("GENREC_NO_MALLOC_TUNING", "").strip() not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: no ctypes.util lookup (it runs ldconfig)
    except (OSError, AttributeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _tuned
