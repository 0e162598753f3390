"""Semantic IDs: an RQ-VAE (or residual k-means) that turns multimodal item embeddings into 4-code IDs.

    model, report = fit(x, RQVAEConfig())     # x: float [N, D]
    codes = encode(model, x)                  # int64 [N, 4]
    model.save(dir); model = RQVAE.load(dir)
"""
from .config import RQVAEConfig
from .fit import encode, fit
from .generate import build_semantic_ids, generate_semantic_ids, generate_semantic_ids_on_demand, merge_features
from .model import RQVAE

load = RQVAE.load

__all__ = ["RQVAEConfig", "RQVAE", "fit", "encode", "load", "build_semantic_ids", "generate_semantic_ids", "generate_semantic_ids_on_demand",
           "merge_features"]
