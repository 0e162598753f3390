"""A checkpoint is a folder: model.pt (state_dict), config.json (everything needed to rebuild the model),
and, when the model was trained with semantic IDs, the RQ-VAE that made them (rqvae/) and the IDs themselves.
config.json is written last: a folder without it is not a checkpoint."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from genrec.core.safeio import atomic_open, write_json
from dataset.semantic_ids import SEMANTIC_ID_FILE, load_semantic_ids, save_semantic_ids
from dataset.store import FeatureSchema
from rqvae import RQVAE

from .recommender import ModelConfig, Recommender

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE, RQVAE_DIR = "model.pt", "config.json", "rqvae"


def is_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and (d / MODEL_FILE).is_file()


def save_checkpoint(directory: str | os.PathLike, model: Recommender, info: Mapping[str, Any],
                    rqvae: RQVAE | None = None, rqvae_features: list[str] | None = None,
                    semantic_ids: Mapping[int, list[int]] | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).unlink(missing_ok=True)  # mark incomplete while we write
    with atomic_open(d / MODEL_FILE, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
    if rqvae is not None:
        rqvae.save(d / RQVAE_DIR)
    elif (d / RQVAE_DIR).exists():
        shutil.rmtree(d / RQVAE_DIR)
    if semantic_ids:
        save_semantic_ids(d / SEMANTIC_ID_FILE, semantic_ids)
    else:
        (d / SEMANTIC_ID_FILE).unlink(missing_ok=True)
    write_json(d / CONFIG_FILE, {"format_version": 1, "model": model.cfg.to_dict(), "schema": model.schema.to_dict(),
                                 "rqvae": {"features": rqvae_features} if rqvae is not None else None,
                                 "train": dict(info)})
    return d


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[Recommender, dict, RQVAE | None, dict[int, list[int]]]:
    """(model in eval mode, config.json, the bundled RQ-VAE or None, the semantic IDs it was trained with)."""
    d = Path(directory)
    if not is_checkpoint(d):
        raise FileNotFoundError(f"no checkpoint in {d} (want {MODEL_FILE} and {CONFIG_FILE})")
    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        schema = FeatureSchema.from_dict(meta["schema"])
        model = Recommender(schema, ModelConfig.from_dict(meta["model"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{d / CONFIG_FILE}: not a checkpoint config this version can read ({type(e).__name__}: "
                         f"{e})") from None
    try:
        model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - truncated, hostile or another version's weights: one line, no traceback
        raise ValueError(f"{d / MODEL_FILE}: cannot load the model's weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); retrain or restore it") from None
    rq = None
    if meta.get("rqvae") and (d / RQVAE_DIR).is_dir():
        try:
            rq = RQVAE.load(d / RQVAE_DIR, device)
        except Exception as e:  # noqa: BLE001 - the recommender is fine without it: the bootstrap degrades
            log.warning("%s: the checkpoint's RQ-VAE cannot be loaded (%s: %s); new items get no semantic IDs from "
                        "it", d / RQVAE_DIR, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    sids: dict[int, list[int]] = {}
    if (d / SEMANTIC_ID_FILE).is_file():
        try:
            sids, _ = load_semantic_ids(d / SEMANTIC_ID_FILE, schema.sid_levels, schema.sid_codebook)
        except ValueError as e:
            log.warning("%s", e)
    return model.to(device).eval(), meta, rq, sids
