"""RQ-VAE configuration: defaults are the documented ones; CLI flags map onto the fields one to one (through
genrec.core.cli in the CLIs). Impossible settings are refused when the config is made, before any work."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from genrec.core.cli import CliError, check_number, check_whole

METHODS = ("rqvae", "rqkmeans")
KMEANS_INITS = ("auto", "kmeans++", "random")


@dataclass
class RQVAEConfig:
    num_quantizers: int = 4
    codebook_size: int = 256
    commitment_cost: float = 0.25
    lr: float = 1e-3
    num_epochs: int = 20
    batch_size: int = 1024
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    method: str = "rqvae"  # "rqvae" (encoder + residual quantizer + decoder) or "rqkmeans" (no network)
    dedup: bool = False  # move colliding items to free last-level codes within their prefix
    hidden_dims: tuple[int, ...] = (128,)
    latent_dim: int = 32
    kmeans_iters: int = 15
    kmeans_sample: int = 16384  # points per k-means fit (codebook init and rqkmeans): 64 per code
    kmeans_init: str = "auto"  # "kmeans++" or "random"; "auto": random under balanced assignment, else kmeans++
    pca_dim: int = 64  # rqkmeans: project the standardised input onto this many principal components (0: none)
    balanced: bool = True  # rqkmeans: balanced assignment (every code gets about the same number of items)
    encode_batch_size: int = 65536

    def __post_init__(self) -> None:
        """Every setting checked (CliError: one line naming the flag, exit 2 in a CLI)."""
        def bad(name: str, want: str) -> CliError:
            return CliError(f"--{name} {getattr(self, name)!r}: {want}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        if self.kmeans_init not in KMEANS_INITS:
            raise bad("kmeans_init", f"must be one of {', '.join(KMEANS_INITS)}")
        for name in ("num_quantizers", "codebook_size", "num_epochs", "batch_size", "latent_dim", "encode_batch_size",
                     "kmeans_iters", "kmeans_sample"):
            check_whole(self, name)
        if self.kmeans_sample < self.codebook_size:
            raise bad("kmeans_sample", f"must be >= --codebook_size ({self.codebook_size}): k-means needs a point "
                                       f"per code")
        check_whole(self, "pca_dim", 0)
        check_number(self, "commitment_cost")
        check_number(self, "lr", positive=True)
        try:
            self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        except (TypeError, ValueError):
            raise bad("hidden_dims", "must be whole numbers >= 1") from None
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise bad("hidden_dims", "must be whole numbers >= 1")

    def balanced_assignment(self) -> bool:
        """Whether codes are assigned with balancing biases: rqkmeans with --balanced (the RQ-VAE never)."""
        return self.balanced and self.method == "rqkmeans"

    def kmeans_start(self) -> str:
        """The init every level's k-means uses. "auto" is k-means++ except under balanced assignment (rqkmeans
        --balanced): D^2 sampling puts codes on a heavy tail's outliers, which no bias fills (on a heavy-tailed
        set the least level perplexity ran 2-20 of 32 over seeds with k-means++, 18-19 with a random start)."""
        if self.kmeans_init != "auto":
            return self.kmeans_init
        return "random" if self.balanced_assignment() else "kmeans++"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RQVAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # For the CLIs (genrec.core.cli.add_dataclass_arguments): allowed values and the other accepted flag names.
    CHOICES = {"method": METHODS, "kmeans_init": KMEANS_INITS}
    ALIASES = {"num_epochs": ("epochs",)}  # train.py says --epochs
