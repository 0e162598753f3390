"""The RQ-VAE module: input standardisation, encoder MLP, residual quantizer, decoder MLP."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from genrec.core.safeio import atomic_open, write_json

from .config import RQVAEConfig
from .quantizer import ResidualQuantizer


class PCA(nn.Module):
    """A fixed linear projection onto the top principal components (rqkmeans --pca_dim): residual k-means in a
    few dozen dimensions that carry the variance, where nearest-centroid assignment still discriminates (in
    1024+ dimensions of near-isotropic residual every centroid is about equally far)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("components", torch.zeros(out_dim, in_dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Components from a centred sample `x` [n, in_dim] (randomised SVD, seeded by torch's generator)."""
        k = self.components.shape[0]
        _, _, v = torch.svd_lowrank(x.float(), q=min(k + 10, *x.shape), niter=4)
        self.components.zero_()
        self.components[:v.shape[1]] = v[:, :k].T.to(self.components)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.components.T

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components


class _Inverse(nn.Module):
    def __init__(self, pca: PCA):
        super().__init__()
        self._pca = [pca]  # not a submodule: its buffer belongs to the encoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._pca[0].inverse(z)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """x -> standardise -> encoder -> residual quantizer -> decoder. With method 'rqkmeans' there is no network:
    the encoder is a PCA projection (or the identity, with pca_dim 0) and the decoder its transpose."""

    def __init__(self, in_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.in_dim, self.cfg = in_dim, cfg
        # Per-dimension mean and one global scale: keeps the embedding's geometry, makes its RMS 1.
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(()))
        if cfg.method == "rqkmeans" and 0 < cfg.pca_dim < in_dim:
            self.encoder = PCA(in_dim, cfg.pca_dim)
            self.decoder = _Inverse(self.encoder)
            latent = cfg.pca_dim
        elif cfg.method == "rqkmeans":
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
            latent = in_dim
        else:
            self.encoder = _mlp([in_dim, *cfg.hidden_dims, cfg.latent_dim])
            self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), in_dim])
            latent = cfg.latent_dim
        self.quantizer = ResidualQuantizer(cfg.num_quantizers, cfg.codebook_size, latent)

    def standardise(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """(x - mean) / scale; `inplace` overwrites x (a batch buffer of ours) instead of making two more
        batch-sized tensors."""
        if inplace:
            return x.sub_(self.mean).div_(self.scale)
        return (x - self.mean) / self.scale

    def forward(self, x_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On standardised input: (reconstruction, codes, commitment loss)."""
        z_q, codes, commit = self.quantizer(self.encoder(x_std))
        return self.decoder(z_q), codes, commit

    # --- persistence: weights with torch.save, everything needed to rebuild in JSON ------------------
    MODEL_FILE = "rqvae_model.pt"
    CONFIG_FILE = "rqvae_config.json"

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `rqvae_model.pt` (state_dict) and `rqvae_config.json` atomically into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_open(d / self.MODEL_FILE, "wb") as f:
            torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, f)
        write_json(d / self.CONFIG_FILE, {"format_version": 1, "in_dim": self.in_dim, "config": self.cfg.to_dict(),
                                          "normalisation": {"mean": self.mean.cpu().tolist(), "scale": float(self.scale)}})
        return d

    def fingerprint(self) -> str:
        """A short hash of everything that decides the codes (config, input width, normalisation, weights and
        codebooks): two RQ-VAEs with the same fingerprint give every item the same semantic ID. Stable across
        save / load and devices."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("device", "encode_batch_size")}  # no effect on codes
        h = hashlib.sha256(json.dumps({"in_dim": self.in_dim, "config": cfg}, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # What an RQ-VAE saved before these fields existed was made with (rqkmeans: no PCA, random init, unbalanced).
    LEGACY = {"pca_dim": 0, "kmeans_init": "random", "balanced": False}

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "RQVAE":
        """Rebuild from `save`'s files; the weights load with weights_only=True (no code runs)."""
        d = Path(directory)
        meta = json.loads((d / cls.CONFIG_FILE).read_text())
        # Fields a config lacks were written by a version before them: take that version's behaviour.
        model = cls(int(meta["in_dim"]), RQVAEConfig.from_dict({**RQVAE.LEGACY, **meta["config"]}))
        state = torch.load(d / cls.MODEL_FILE, map_location="cpu", weights_only=True)
        state.setdefault("quantizer.bias", model.quantizer.bias)  # written before balanced assignment existed
        model.load_state_dict(state)
        return model.to(device).eval()
