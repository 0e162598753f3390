"""A checkpoint is a folder: model.pt (state_dict), config.json (everything needed to rebuild the model),
and, when the model was trained with semantic IDs, the RQ-VAE that made them (rqvae/) and the IDs themselves.
A checkpoint changes as one unit: it is written into a sibling folder and swapped in by one rename, so a reader
sees the old checkpoint or the new one, never a mix. config.json carries `format_version`; older versions are
brought up to date by `migrate()` when loaded."""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dataset.semantic_ids import SEMANTIC_ID_FILE, file_sha256, load_semantic_ids, save_semantic_ids
from dataset.store import FeatureSchema
from genrec.core.safeio import atomic_open, write_json
from rqvae import RQVAE

from .recommender import ModelConfig, Recommender

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE, RQVAE_DIR = "model.pt", "config.json", "rqvae"
FORMAT_VERSION = 2


def is_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and (d / MODEL_FILE).is_file()


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config.json (migrated to FORMAT_VERSION), the RQ-VAE that
    made its semantic IDs (None when it has none or it cannot be read) and the IDs it was trained with."""

    path: Path
    model: Recommender
    meta: dict
    rqvae: RQVAE | None = None
    trained_ids: dict[int, list[int]] = field(default_factory=dict)

    @property
    def rqvae_features(self) -> list[str] | None:
        return (self.meta.get("rqvae") or {}).get("features")


# --- config.json migrations: one function per format step, applied in order by migrate() ----------------------

# What version-1 configs that do not name these model fields were trained with (the first model).
_V1_MODEL_DEFAULTS = {"sid_embedding": "level", "item_bias": False, "history_bias": False, "logq": False,
                      "action_embedding": False, "action_query": False}


def _v1_to_v2(meta: dict) -> dict:
    """Version 1 left out model fields added after it; their absence meant the first model's behaviour. Version 2
    names every field."""
    return {**meta, "model": {**_V1_MODEL_DEFAULTS, **meta.get("model", {})}, "format_version": 2}


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def migrate(meta: dict) -> dict:
    """config.json of any version this code knows, brought to FORMAT_VERSION (a config without a version is 1)."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise ValueError(f"format_version {version}: written by a newer version of this code (this one reads up to "
                         f"{FORMAT_VERSION}); upgrade genrec-sid")
    while version < FORMAT_VERSION:
        meta = MIGRATIONS[version](meta)
        version = meta["format_version"]
    return meta


# --- writing: a new folder beside the old one, swapped in by one rename ------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the file system or kernel cannot: rename twice
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def staging_dir(directory: str | os.PathLike) -> Path:
    """The sibling folder a checkpoint of `directory` is built in (and train.py's in-progress state lives in)."""
    d = Path(directory)
    return d.parent / f".{d.name}.staging"


def publish(staged: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Make the folder `staged` the checkpoint at `directory` in one step: a reader sees the old folder or the
    new one, never a mix. The old folder is removed afterwards."""
    staged, d = Path(staged), Path(directory)
    if d.exists() and _exchange(staged, d):
        shutil.rmtree(staged)  # now the old checkpoint
        return d
    old = d.parent / f".{d.name}.old"
    if d.exists():  # no atomic exchange here: the old one steps aside for the time of one rename
        shutil.rmtree(old, ignore_errors=True)
        os.replace(d, old)
    os.replace(staged, d)
    shutil.rmtree(old, ignore_errors=True)
    return d


def write_checkpoint(d: Path, model: Recommender, info: Mapping[str, Any], rqvae: RQVAE | None = None,
                     rqvae_features: list[str] | None = None,
                     semantic_ids: Mapping[int, list[int]] | None = None) -> Path:
    """Write a checkpoint's files into the folder `d` (a staging folder: see save_checkpoint)."""
    d.mkdir(parents=True, exist_ok=True)
    with atomic_open(d / MODEL_FILE, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
    if rqvae is not None:
        rqvae.save(d / RQVAE_DIR)
    elif (d / RQVAE_DIR).exists():
        shutil.rmtree(d / RQVAE_DIR)
    parts: dict[str, str] = {}
    if semantic_ids:
        save_semantic_ids(d / SEMANTIC_ID_FILE, semantic_ids)
        parts[SEMANTIC_ID_FILE] = file_sha256(d / SEMANTIC_ID_FILE)
    else:
        (d / SEMANTIC_ID_FILE).unlink(missing_ok=True)
    if rqvae is not None:
        parts[RQVAE_DIR] = rqvae.fingerprint()
    write_json(d / CONFIG_FILE, {"format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                                 "schema": model.schema.to_dict(),
                                 "rqvae": {"features": rqvae_features} if rqvae is not None else None,
                                 "parts": parts, "train": dict(info)})
    return d


def save_checkpoint(directory: str | os.PathLike, model: Recommender, info: Mapping[str, Any],
                    rqvae: RQVAE | None = None, rqvae_features: list[str] | None = None,
                    semantic_ids: Mapping[int, list[int]] | None = None) -> Path:
    """Write a complete checkpoint beside `directory` and swap it in: an interrupted save leaves the old one."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    staged = d.parent / f".{d.name}.saving-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        write_checkpoint(staged, model, info, rqvae, rqvae_features, semantic_ids)
        return publish(staged, d)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint in `directory`, its config migrated to this version; a bad one is a one-line ValueError."""
    d = Path(directory)
    if not is_checkpoint(d):
        raise FileNotFoundError(f"no checkpoint in {d} (want {MODEL_FILE} and {CONFIG_FILE})")
    try:
        meta = migrate(json.loads((d / CONFIG_FILE).read_text(encoding="utf-8")))
        schema = FeatureSchema.from_dict(meta["schema"])
        model = Recommender(schema, ModelConfig.from_dict(meta["model"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{d / CONFIG_FILE}: not a checkpoint config this version can read ({type(e).__name__}: "
                         f"{e})") from None
    try:
        model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - untrusted bytes: truncated, hostile or another version's weights
        log.debug("%s", d / MODEL_FILE, exc_info=True)
        raise ValueError(f"{d / MODEL_FILE}: cannot load the model's weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); retrain or restore it") from None
    # The parts config.json names (version 2 on) must be the ones it was written with: a part changed by anything
    # else (an interrupted copy, another run writing into the folder) is not served.
    parts = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}
    rq = None
    if meta.get("rqvae") and (d / RQVAE_DIR).is_dir():
        try:
            rq = RQVAE.load(d / RQVAE_DIR, device)
        except Exception as e:  # noqa: BLE001 - untrusted bytes; the recommender is fine without it
            log.debug("%s", d / RQVAE_DIR, exc_info=True)
            log.warning("%s: the checkpoint's RQ-VAE cannot be loaded (%s: %s); new items get no semantic IDs from "
                        "it", d / RQVAE_DIR, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        fingerprint = rq.fingerprint() if rq is not None and RQVAE_DIR in parts else None
        if fingerprint is not None and fingerprint != parts[RQVAE_DIR]:
            log.warning("%s is not the RQ-VAE this checkpoint was written with (fingerprint %s, config.json says %s): "
                        "not used; new items get no semantic IDs from it", d / RQVAE_DIR, fingerprint,
                        parts[RQVAE_DIR])
            rq = None
    sids: dict[int, list[int]] = {}
    path = d / SEMANTIC_ID_FILE
    if model.cfg.use_semantic_ids and (SEMANTIC_ID_FILE in parts or path.exists()):
        why = None
        try:
            if SEMANTIC_ID_FILE in parts and file_sha256(path) != parts[SEMANTIC_ID_FILE]:
                why = "changed since the checkpoint was written"
            else:
                sids, _ = load_semantic_ids(path, schema.sid_levels, schema.sid_codebook)
        except FileNotFoundError:
            why = "missing"
        except (ValueError, OSError) as e:
            why = f"unreadable ({e})"
        if why:
            sids = {}
            log.warning("%s, the semantic IDs the model was trained with, is %s: the training items are served "
                        "without them unless a file of the checkpoint's RQ-VAE is found", path, why)
    return Checkpoint(d, model.to(device).eval(), meta, rq, sids)
