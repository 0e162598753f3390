"""What the quality benchmarks share: train our model on a fresh copy of a split, infer under chosen rules,
summarise seeds as mean ± std."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from evalu.infer import InferConfig, run
from genrec.recommender.recommender import ModelConfig
from genrec.recommender.trainer import TrainConfig, train

# Files a run writes into a data dir; a fresh copy leaves them out so every seed makes its own.
GENERATED = (".genrec_cache", "semantic_id_dict.json", "semantic_id_report.json", "rqvae_model.pt",
             "rqvae_config.json", ".semantic_id_dict.json.lock")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags every quality bench shares: threads, work dir, JSON output."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--keep", help="keep the work dir here")
    p.add_argument("--out", help="write every figure as JSON here")


def start(a: argparse.Namespace, name: str) -> Path:
    """Quiet logs, the thread count, and the work dir (`--keep`, else a temporary one)."""
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    return Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))


def fresh_copy(split: str | Path, dst: str | Path) -> Path:
    """`split` copied to `dst` without generated files (semantic IDs, RQ-VAE, embedding cache)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(split, dst, ignore=shutil.ignore_patterns(*GENERATED))
    return dst


def train_and_infer(train_dir: Path, eval_dir: Path, work: Path, seed: int, rules: Iterable[str],
                    model: dict[str, Any] | None = None, device: str = "cpu", **train_kw: Any) -> dict:
    """Train one model (validation rule = `train_kw["filter_seen"]`, default auto) and infer on `eval_dir` under
    each of `rules`: "filtered", "unfiltered" or "chosen" (what the checkpoint's validation chose).
    Returns {rule: infer_report metrics, "chosen_rule": whether validation chose filtering, "boot": the first
    inference's semantic-ID stage (seconds, status), "seconds": train + infer}."""
    for old in [work / "ckpt", *work.glob("res_*")]:  # a previous run's IDs there would be served (results dir)
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    ck = train(TrainConfig(data_dir=str(train_dir), output_dir=str(work / "ckpt"), seed=seed, device=device,
                           model=ModelConfig(**(model or {})), **train_kw))
    out: dict[str, Any] = {}
    for rule in rules:
        fs = {"filtered": True, "unfiltered": False, "chosen": None}[rule]
        _, _, rep = run(InferConfig(data_dir=str(eval_dir), model_dir=str(ck), result_dir=str(work / f"res_{rule}"),
                                    labels=str(eval_dir / "labels.jsonl"), filter_seen=fs, device=device))
        out[rule] = rep["metrics"]
        out.setdefault("boot", {"seconds": rep["seconds"]["semantic_ids"], "status": rep["semantic_id"]["status"]})
        if fs is None:
            out["chosen_rule"] = rep["filter_seen"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def mean_std(values: Iterable[float], digits: int = 4) -> str:
    v = np.asarray(list(values), np.float64)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) else "-"


# (part, metric) columns of the per-variant tables: overall, cold-start targets, warm targets
METRIC_COLUMNS = (("overall", "hr@10"), ("overall", "ndcg@10"), ("overall", "score"), ("cold_start", "hr@10"),
                  ("cold_start", "ndcg@10"), ("warm", "hr@10"), ("warm", "ndcg@10"))


def metric_cells(runs: list[dict], columns: Iterable[tuple[str, str]] = METRIC_COLUMNS) -> str:
    """'mean ± std | ...' over seeds of infer_report metrics (plus a "filtered" flag each), then the rules chosen."""
    return " | ".join([*(mean_std(m[part][k] for m in runs) for part, k in columns),
                       "/".join("y" if m["filtered"] else "n" for m in runs)])


def world_changes(world: dict[str, Any]) -> dict[str, Any]:
    """The demo-world fields of `world` that differ from SynthConfig's defaults, in the given order."""
    from dataset.synth import SynthConfig

    default = SynthConfig()
    return {k: v for k, v in world.items() if v != getattr(default, k)}


def machine() -> str:
    """One line: CPU model, cores, torch version and threads, date (for a results file's header)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def write_results(name: str, title: str, body: list[str], command: str | None = None) -> Path:
    """bench/results/<name>.md ($GENREC_BENCH_RESULTS/<name>.md when set): title, the command, the machine, then
    `body` (a table and its lines). Replaces the file: git keeps the history."""
    from genrec.core.safeio import atomic_open

    command = command or "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    root = Path(os.environ.get("GENREC_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.md"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", "", *body, ""]))
    return path


class Report:
    """A bench's output: each line printed as it comes and kept for its results file (`write`)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "", **_: Any) -> None:
        print(line, flush=True)
        self.lines += str(line).split("\n")

    def write(self, name: str, title: str) -> Path:
        path = write_results(name, title, [ln[2:] if ln.startswith("# ") else ln for ln in self.lines])
        print(f"wrote {path}")
        return path


def demo_world(root: Path, seed: int, test_users: int = 2000, cold_frac: float = 0.2,
               **world: Any) -> tuple[Path, Path]:
    """The demo world of `seed` (SynthConfig defaults but for `world`'s fields): (train dir, eval dir), made once
    under `root`."""
    from dataset.synth import SynthConfig, generate

    cfg = SynthConfig(seed=seed, test_users=test_users, cold_frac=cold_frac, **world)
    w = root / "_".join([f"demo{seed}", *(f"{k}{v}" for k, v in sorted(world_changes(world).items()))])
    if not (w / "eval" / "labels.jsonl").is_file():
        generate(w / "train", cfg, eval_out=w / "eval")
    return w / "train", w / "eval"


def ml100k_cold(root: Path, seed: int, cold_frac: float = 0.1, data_root: str | None = None,
                ratings_as_actions: bool = False) -> Path:
    """The MovieLens-100k cold-start split of `seed` (converted once under `root`, or found in `data_root`);
    `ratings_as_actions`: stars as actions (genrec-convert-ml100k --ratings_as_actions)."""
    name = f"{'actions' if ratings_as_actions else 'cold'}{seed}"
    if data_root:
        return Path(data_root) / name
    from dataset.convert_ml100k import convert

    d = root / name
    if not (d / "labels.jsonl").is_file():
        convert(d, cold_frac=cold_frac, seed=seed, ratings_as_actions=ratings_as_actions)
    return d
