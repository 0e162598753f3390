"""torch.distributed, the one place that calls it: who we are in a torchrun job, and the few collectives training
and inference need. Without a process group (plain `python ...`) every helper is a no-op for one process."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_lead() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the torchrun job this process was started in (WORLD_SIZE > 1): nccl with one GPU per rank, else
    gloo. Collectives time out after $GENREC_DIST_TIMEOUT seconds (default 1800): a dead rank never leaves the
    others waiting for ever. Returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("GENREC_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(t: torch.Tensor) -> torch.device:
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (works for CPU tensors under nccl and GPU tensors under gloo too)."""
    if world() > 1:
        dev = _comm_device(t)
        x = t.to(dev)
        dist.all_reduce(x)
        if x is not t:
            t.copy_(x)
    return t


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Data-parallel step: every rank's gradients replaced by their mean over ranks (one collective; a
    parameter without a gradient on some rank counts as zeros there, so ranks never disagree on the calls)."""
    if world() <= 1:
        return
    ps = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
    all_reduce_sum_(flat)
    flat /= world()
    pos = 0
    for p in ps:
        n = p.numel()
        p.grad = flat[pos:pos + n].view_as(p).clone()
        pos += n


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world() > 1:
        dev = _comm_device(t)
        x = t.to(dev)
        dist.broadcast(x, src)
        if x is not t:
            t.copy_(x)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order, on every rank (row counts may differ between ranks)."""
    if world() <= 1:
        return t
    dev = _comm_device(t)
    x = t.to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([len(x)], dtype=torch.long, device=dev))
    most = max(int(s) for s in sizes)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (small things: counts, reports, errors)."""
    if world() <= 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if world() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def my_slice(n: int) -> slice:
    """This rank's contiguous share of n rows."""
    w, r = world(), rank()
    return slice(n * r // w, n * (r + 1) // w)
