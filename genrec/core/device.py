"""Device choice and memory figures, shared by the RQ-VAE, the trainer and inference."""
from __future__ import annotations

import resource

import torch

DEVICES = "auto (cuda when available), cpu, cuda, cuda:N"


class DeviceError(ValueError):
    """A --device this machine cannot use (a CLI exits 2 with this one line)."""

    exit_code = 2


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. A device this machine lacks is a DeviceError naming the way out,
    not torch's traceback."""
    name = str(name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r}: not a device (use {DEVICES})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this machine has no usable CUDA GPU (or this torch build has no CUDA "
                           f"support); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {name}: unsupported (use {DEVICES})")
    return dev


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MB."""
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
