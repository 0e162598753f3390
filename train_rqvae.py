"""Pre-generate semantic IDs: python train_rqvae.py --data_dir D [--output_dir O] [--mm_emb_id 81 82 ...]

Writes O/semantic_id_dict.json, O/rqvae_model.pt, O/rqvae_config.json and O/semantic_id_report.json (with --plot
also O/semantic_id_report.png). Every flag also takes its dashed spelling (--data-dir).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `python train_rqvae.py` from anywhere: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from genrec.core import dist as rdist
from genrec.core.alloc import tune_allocator
from genrec.core.cli import (CliError, FlagParser, add_bool, add_dataclass_arguments, add_logging_arguments,
                             from_namespace, run_cli, setup_logging)
from genrec.core.device import resolve_device
from rqvae import RQVAEConfig, generate_semantic_ids_on_demand

log = logging.getLogger("train_rqvae")


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__)
    p.add_argument("--data_dir", default=os.environ.get("TRAIN_DATA_PATH") or None,
                   help="competition data folder holding creative_emb/ (env TRAIN_DATA_PATH)")
    p.add_argument("--output_dir", default=None,
                   help="where the IDs, the model and the report go (default: the data folder, where train.py and "
                        "infer look for the IDs)")
    p.add_argument("--mm_emb_id", nargs="+", default=["81"], help="creative_emb feature ids to merge (default 81)")
    add_bool(p, "plot", False, "also write semantic_id_report.png (needs the plot extra: matplotlib)")
    add_dataclass_arguments(p, RQVAEConfig, help={"device": "auto (cuda when available), cpu, cuda"})
    add_logging_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("--data_dir (or TRAIN_DATA_PATH) is required")
    args.output_dir = args.output_dir or args.data_dir
    return args


def _run(args: argparse.Namespace) -> int:
    if not (Path(args.data_dir) / "creative_emb").is_dir():
        raise CliError(f"--data_dir {args.data_dir}: no creative_emb/ folder there")
    cfg = from_namespace(RQVAEConfig, args)  # impossible settings: one line, exit 2, before any work
    device = resolve_device(cfg.device)  # a missing GPU is one line, not a traceback later
    if args.plot:
        from rqvae.plot import require_matplotlib

        require_matplotlib()
    # Under torchrun every rank trains on its share of each batch; rank 0 writes.
    device = rdist.init_from_env(device)
    if rdist.world() > 1:
        cfg = replace(cfg, device=str(device))
    try:
        sids = generate_semantic_ids_on_demand(args.data_dir, args.mm_emb_id, cfg, output_dir=args.output_dir,
                                               model_dir=args.output_dir, data_parallel=rdist.world() > 1)
    finally:
        lead = rdist.is_lead()
        rdist.close()
    if not sids:
        return 1
    if not lead:
        return 0
    out = Path(args.output_dir)
    if args.plot:
        from rqvae.plot import plot_report

        log.info("wrote %s", plot_report(out / "semantic_id_report.json"))
    print(f"semantic IDs for {len(sids)} items -> {out / 'semantic_id_dict.json'} "
          f"(report {out / 'semantic_id_report.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args)
    tune_allocator()
    return run_cli(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
