"""Train the recommender: python train.py --data_dir D --output_dir O [flags]

Env fallbacks: TRAIN_DATA_PATH for --data_dir, TRAIN_CKPT_PATH for --output_dir.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from model.trainer import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.environ.get("TRAIN_DATA_PATH"))
    p.add_argument("--output_dir", default=os.environ.get("TRAIN_CKPT_PATH"))
    TrainConfig.add_arguments(p)
    a = p.parse_args(argv)
    if not a.data_dir or not a.output_dir:
        p.error("--data_dir and --output_dir (or TRAIN_DATA_PATH and TRAIN_CKPT_PATH) are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(TrainConfig.from_args(a))
    except (OSError, ValueError) as e:
        logging.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
