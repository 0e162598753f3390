"""Benchmark: loading creative_emb part files.

Builds N x D JSON-lines part files and times, each stage in a fresh process (so peak memory is its own):
  baseline     the public baseline's pattern: one json.loads per line into a dict of numpy arrays
  first        our first load (parse + write the binary cache): with pandas (the `fast` extra), and without
  cached       our later load (memory-maps the cache), and the same plus reading every value once
  pickle       the same rows as one `emb_<fid>_<dim>.pkl` dict (the layout of feature 81): pickle.load as the
               baseline does, against our first load of it (restricted unpickler + cache)

    python bench/load_mm_emb.py [--n 1000000 --dim 32 --parts 4]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from genrec.core.cli import FlagParser, add_bool  # noqa: E402
from harness import Report  # noqa: E402


def write_parts(folder: Path, n: int, dim: int, parts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    row_fmt = ",".join(["%.6f"] * dim)
    per = -(-n // parts)
    for p in range(parts):
        with open(folder / f"part-{p:05d}", "w") as f:
            for lo in range(p * per, min(n, (p + 1) * per), 50_000):
                hi = min(lo + 50_000, (p + 1) * per, n)
                x = rng.normal(size=(hi - lo, dim)).astype(np.float32)
                f.write("".join('{"anonymous_cid": %d, "emb": [%s]}\n' % (lo + i + 1, row_fmt % tuple(r))
                                for i, r in enumerate(x.tolist())))


# Our stages load as the entry points do (infer, train.py, train_rqvae.py): after setting the allocator
# (GENREC_NO_MALLOC_TUNING=1 in a stage's environment keeps glibc's defaults).
OURS = "from dataset.mm_emb import load_feature\nfrom genrec.core.alloc import tune_allocator\ntune_allocator()"

# (imports, work): peak memory is counted from after the imports, so torch's own footprint is not charged.
STAGES = {
    "baseline": ("import json, numpy as np, pathlib", """
emb = {}
for f in sorted(pathlib.Path(FOLDER).iterdir()):
    with open(f) as fh:
        for line in fh:
            d = json.loads(line)
            emb[d["anonymous_cid"]] = np.array(d["emb"], dtype=np.float32)
N = len(emb)
"""),
    # every load of ours is this one call: the folder and the environment decide its path (parse, pickle, cache)
    "load": (OURS, """
e = load_feature(EMB, FID)
N = len(e)
"""),
    "pickle baseline": ("import pickle, pathlib", """
with open(next(pathlib.Path(EMB).glob("emb_*.pkl")), "rb") as fh:
    emb = pickle.load(fh)
N = len(emb)
"""),
    "load+read": (OURS, """
e = load_feature(EMB, FID)
s = float(e.emb.sum())
N = len(e)
"""),
}


def write_pickle(path: Path, n: int, dim: int, seed: int = 0) -> None:
    import pickle

    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    with open(path, "wb") as f:
        pickle.dump({i + 1: row for i, row in enumerate(x)}, f, protocol=4)


def run_stage(name: str, emb_dir: Path, fid: str, folder: Path, env: dict | None = None) -> dict:
    code = f"""
import sys, time, resource, json
sys.path.insert(0, {str(ROOT)!r})
EMB, FID, FOLDER = {str(emb_dir)!r}, {fid!r}, {str(folder)!r}
{STAGES[name][0]}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t = time.perf_counter()
{STAGES[name][1]}
dt = time.perf_counter() - t
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({{"seconds": dt, "rows": N, "peak_mb": status("VmHWM:"), "base_mb": base, "worker_peak_mb": kids}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "GENREC_CACHE_DIR": str(emb_dir.parent / "cache"), **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = FlagParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--parts", type=int, default=4)
    add_bool(p, "skip_baseline", False, "leave out the public baseline's stage")
    a = p.parse_args()
    say = Report()
    tmp = Path(tempfile.mkdtemp(prefix="bench_mm_"))
    try:
        emb_dir = tmp / "creative_emb"
        folder = emb_dir / f"emb_82_{a.dim}"
        t = time.perf_counter()
        write_parts(folder, a.n, a.dim, a.parts)
        size = sum(f.stat().st_size for f in folder.iterdir())
        say(f"# {a.n} x {a.dim} in {a.parts} part files, {size / 2**20:.0f} MiB of JSON (written in "
              f"{time.perf_counter() - t:.1f} s); matrix {a.n * a.dim * 4 / 2**20:.0f} MiB")
        rows = {}
        if not a.skip_baseline:
            rows["baseline (json.loads per line -> dict)"] = run_stage("baseline", emb_dir, "82", folder)
        pure = emb_dir / "pure" / "creative_emb"  # its own copy: the first load must not find the other's cache
        shutil.copytree(emb_dir, pure)
        rows["ours, first load, no pandas"] = run_stage("load", pure, "82", pure / folder.name,
                                                        {"GENREC_NO_PANDAS": "1"})
        shutil.rmtree(pure.parent)
        plain = emb_dir / "plain" / "creative_emb"  # the same, glibc's allocator defaults
        shutil.copytree(emb_dir, plain, ignore=shutil.ignore_patterns("pure", "plain"))
        rows["ours, first load, glibc allocator defaults"] = run_stage("load", plain, "82", plain / folder.name,
                                                                       {"GENREC_NO_MALLOC_TUNING": "1"})
        shutil.rmtree(plain.parent)
        rows["ours, first load (parse + cache)"] = run_stage("load", emb_dir, "82", folder)
        rows["ours, cached load (memmap)"] = run_stage("load", emb_dir, "82", folder)
        rows["ours, cached load + read all"] = run_stage("load+read", emb_dir, "82", folder)
        pkl = tmp / "pkl" / "creative_emb"
        pkl.mkdir(parents=True)
        write_pickle(pkl / f"emb_81_{a.dim}.pkl", a.n, a.dim)
        pickle_rows = {"pickle: baseline (pickle.load)": run_stage("pickle baseline", pkl, "81", pkl),
                       "pickle: ours, first load (restricted unpickler + cache)": run_stage("load", pkl, "81", pkl)}
        matrix_mb = a.n * a.dim * 4 / 2**20
        say("| stage | seconds | vs baseline | peak RSS MiB (over interpreter) | peak / matrix | parse-worker peak RSS MiB |")
        say("|---|---|---|---|---|---|")
        base = rows.get("baseline (json.loads per line -> dict)", {}).get("seconds")
        for name, r in [*rows.items(), *pickle_rows.items()]:
            if name.startswith("pickle"):
                base = pickle_rows["pickle: baseline (pickle.load)"]["seconds"]
            ratio = f"{base / r['seconds']:.1f}x faster" if base else "-"
            extra = r["peak_mb"] - r["base_mb"]
            say(f"| {name} | {r['seconds']:.3f} | {ratio} | {extra:.0f} | {extra / matrix_mb:.2f} | "
                  f"{r['worker_peak_mb']:.0f} |")
            assert r["rows"] == a.n, (name, r["rows"])
        say.write("load_mm_emb", "Loading creative_emb/")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
