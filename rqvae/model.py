"""The RQ-VAE module: input standardisation, encoder MLP, residual quantizer, decoder MLP."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dataset.safeio import atomic_open, write_json

from .config import RQVAEConfig
from .quantizer import ResidualQuantizer


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """x -> standardise -> encoder -> residual quantizer -> decoder. With method 'rqkmeans' the encoder and
    decoder are identities and the quantizer works on the standardised input itself."""

    def __init__(self, in_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.in_dim, self.cfg = in_dim, cfg
        # Per-dimension mean and one global scale: keeps the embedding's geometry, makes its RMS 1.
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(()))
        if cfg.method == "rqkmeans":
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
            latent = in_dim
        else:
            self.encoder = _mlp([in_dim, *cfg.hidden_dims, cfg.latent_dim])
            self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), in_dim])
            latent = cfg.latent_dim
        self.quantizer = ResidualQuantizer(cfg.num_quantizers, cfg.codebook_size, latent)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
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

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "RQVAE":
        """Rebuild from `save`'s files; the weights load with weights_only=True (no code runs)."""
        d = Path(directory)
        meta = json.loads((d / cls.CONFIG_FILE).read_text())
        model = cls(int(meta["in_dim"]), RQVAEConfig.from_dict(meta["config"]))
        state = torch.load(d / cls.MODEL_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.to(device).eval()
