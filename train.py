"""Train the recommender: python train.py --data_dir D --output_dir O [flags]

Env fallbacks: TRAIN_DATA_PATH for --data_dir, TRAIN_CKPT_PATH for --output_dir. Every flag also takes its
dashed spelling (--data-dir); booleans take true/false, yes/no, on/off or 1/0, and --no_<flag>.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train.py` from anywhere: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from genrec.core import dist as rdist
from genrec.core.alloc import tune_allocator
from genrec.core.cli import CliError, FlagParser, add_logging_arguments, run_cli, setup_logging
from genrec.core.device import resolve_device
from genrec.recommender.trainer import TrainConfig, train


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__)
    p.add_argument("--data_dir", default=os.environ.get("TRAIN_DATA_PATH") or None,
                   help="training data (env TRAIN_DATA_PATH)")
    p.add_argument("--output_dir", default=os.environ.get("TRAIN_CKPT_PATH") or None,
                   help="where the checkpoint goes (env TRAIN_CKPT_PATH)")
    TrainConfig.add_arguments(p)
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.data_dir or not a.output_dir:
        p.error("--data_dir and --output_dir (or TRAIN_DATA_PATH and TRAIN_CKPT_PATH) are required")
    setup_logging(a)
    tune_allocator()

    def body() -> int:
        if not (Path(a.data_dir) / "seq.jsonl").is_file():
            raise CliError(f"--data_dir {a.data_dir}: no seq.jsonl there (not a training data folder)")
        device = resolve_device(a.device or TrainConfig.device)  # before any output folder exists
        # Under torchrun: data-parallel over the ranks (gloo on CPUs, nccl with one GPU per rank); rank 0 writes.
        device = rdist.init_from_env(device)
        if rdist.world() > 1:
            a.device = str(device)
            if not rdist.is_lead():
                logging.getLogger().setLevel(logging.WARNING)
        cfg = TrainConfig.from_args(a)
        try:
            out = train(cfg)
        finally:
            lead = rdist.is_lead()
            rdist.close()
        if lead:
            print(f"checkpoint -> {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
