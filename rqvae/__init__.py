"""Semantic IDs: an RQ-VAE (or residual k-means) that turns multimodal item embeddings into 4-code IDs.

    model, report = fit(x, RQVAEConfig())     # x: float [N, D]
    codes = encode(model, x)                  # int64 [N, 4]
    model.save(dir); model = RQVAE.load(dir)

The quantizer core (config, kmeans, quantizer, model, fit, dedup, stats) imports only torch, numpy and
genrec.core; `rqvae.generate` is the glue to the competition's files and is imported on first use.
"""
from typing import Any

from .config import RQVAEConfig
from .fit import encode, fit
from .model import RQVAE

load = RQVAE.load

_GLUE = ("build_semantic_ids", "generate_semantic_ids", "generate_semantic_ids_on_demand", "merge_features")

__all__ = ["RQVAEConfig", "RQVAE", "fit", "encode", "load", *_GLUE]


def __getattr__(name: str) -> Any:  # PEP 562: the data layer loads only when the glue is asked for
    if name in _GLUE:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
