"""Pre-generate semantic IDs: python train_rqvae.py --data_dir D --output_dir O [--mm_emb_id 81 82 ...]

Writes O/semantic_id_dict.json, O/rqvae_model.pt, O/rqvae_config.json and O/semantic_id_report.json.
"""
from __future__ import annotations

import argparse
import logging
import sys

from rqvae import RQVAEConfig, generate_semantic_ids_on_demand


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="competition data folder holding creative_emb/")
    p.add_argument("--output_dir", required=True, help="where the IDs, the model and the report go")
    p.add_argument("--mm_emb_id", nargs="+", default=["81"], help="creative_emb feature ids to merge (default 81)")
    RQVAEConfig.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sids = generate_semantic_ids_on_demand(args.data_dir, args.mm_emb_id, args, output_dir=args.output_dir,
                                               model_dir=args.output_dir)
    except (OSError, ValueError) as e:
        logging.error("%s", e)
        return 1
    return 0 if sids else 1


if __name__ == "__main__":
    sys.exit(main())
