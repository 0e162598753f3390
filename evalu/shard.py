"""Inference past one process: ranks of one torchrun job (torch.distributed: nccl on GPUs, gloo on CPUs), or
independent shards that share no network (`--num_shards K --shard_id i`, merged afterwards).

Work is split in whole batches, at the same boundaries a single process uses, so every row is computed exactly
as it would be alone: the sharded result is identical to the single-process one on the same device type.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from genrec.core import dist as rdist
from genrec.core.cli import FlagParser, add_logging_arguments, run_cli, setup_logging
from genrec.core.safeio import DataFormatError, write_json

CAND_CHUNK = 65536  # candidates embedded per call, in one process or many
TOPK_USER_CHUNK = 256  # at most this many users per score block inside retrieval


@dataclass
class Dist:
    """Where this process stands: rank r of `world` (a torchrun job), or the single process (world 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def lead(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> Dist:
    """Join the torchrun job this process belongs to (WORLD_SIZE > 1), or none (see genrec.core.dist)."""
    device = rdist.init_from_env(device)
    return Dist(rank=rdist.rank(), world=rdist.world(), device=device)


def span(n: int, parts: int, part: int, align: int) -> tuple[int, int]:
    """[lo, hi) of `part` when [0, n) is cut into `parts` runs of whole `align`-sized blocks."""
    blocks = math.ceil(n / align) if n else 0
    lo_b, hi_b = blocks * part // parts, blocks * (part + 1) // parts
    return min(lo_b * align, n), min(hi_b * align, n)


def aligned(lo: int, hi: int, n: int, align: int) -> tuple[int, int]:
    """[lo, hi) widened to whole `align`-sized blocks of [0, n) (empty stays empty)."""
    if hi <= lo:
        return lo, lo
    return lo // align * align, min(-(-hi // align) * align, n)


def topk_user_chunk(query_batch_size: int) -> int:
    """Users per retrieval score block: the largest divisor of the query batch up to TOPK_USER_CHUNK, so a split
    at a multiple of the query batch is also a block boundary."""
    return next(c for c in range(min(query_batch_size, TOPK_USER_CHUNK), 0, -1) if query_batch_size % c == 0)


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    return rdist.gather_objects(obj) if d.active else [obj]


def broadcast_object(d: Dist, obj: Any) -> Any:
    return rdist.broadcast_object(obj) if d.active else obj


@contextmanager
def together(d: Dist, what: str) -> Iterator[None]:
    """A stage every rank must get through: a rank that fails tells the others and fails with its own message;
    the others then stop with a RankError instead of waiting for it in the next collective."""
    try:
        yield
    except BaseException:
        try:
            all_ok(d, False, what)
        except RankError:
            pass
        raise
    all_ok(d, True, what)


class RankError(ValueError):
    """Another rank failed: every rank stops with this one line instead of waiting in the next collective."""


def all_ok(d: Dist, ok: bool, what: str) -> None:
    """Every rank reports whether it got through a stage; when one did not, all stop with the same message
    instead of waiting for it in the next collective."""
    if not d.active:
        return
    failed = [r for r, good in enumerate(gather_objects(d, ok)) if not good]
    if failed:
        raise RankError(f"rank(s) {failed} failed during {what}; all ranks stop")


# --- shards without a network ---------------------------------------------------------------------------------

_SHARD_RE = re.compile(r"^result\.shard-(\d+)-of-(\d+)\.json$")


def shard_file(shard_id: int, num_shards: int, stem: str = "result") -> str:
    """`result.shard-000i-of-000K.json` (or the report's, with stem "infer_report")."""
    return f"{stem}.shard-{shard_id:04d}-of-{num_shards:04d}.json"


# Inference settings that may differ between the shards of one run: where things are (the checkpoint and the users
# are fingerprinted themselves), what is only reported or drawn, and which shard a process is.
PER_SHARD = ("data_dir", "result_dir", "model_dir", "labels", "device", "plot", "shard_id")


def run_fingerprint(checkpoint: Path, users: list[str], cfg: Any) -> str:
    """What makes shards parts of one run: the checkpoint (its config.json, which names its parts), the test users
    in order, and every setting of the dataclass `cfg` but PER_SHARD (a setting added later counts by default)."""
    h = hashlib.sha256()
    h.update((Path(checkpoint) / "config.json").read_bytes())
    h.update(json.dumps([str(u) for u in users]).encode())
    h.update(json.dumps({f.name: str(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                         if f.name not in PER_SHARD}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def merge_shards(result_dir: str | os.PathLike, out_name: str = "result.json") -> Path:
    """Merge the partial results of `--num_shards K --shard_id i` runs in `result_dir` into `result.json`
    (users in predict_seq.jsonl order). Missing, repeated or inconsistent shards are a DataFormatError naming them."""
    d = Path(result_dir)
    found: dict[int, dict] = {}
    totals = set()
    for p in sorted(d.glob("result.shard-*-of-*.json")):
        m = _SHARD_RE.match(p.name)
        if not m:
            continue
        try:
            part = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise DataFormatError(f"{p}: unreadable partial result: {e}") from None
        i, k = int(m.group(1)), int(m.group(2))
        if part.get("shard_id") != i or part.get("num_shards") != k:
            raise DataFormatError(f"{p}: says shard {part.get('shard_id')} of {part.get('num_shards')}, named {i} of {k}")
        users_i = part.get("user")
        if not isinstance(users_i, list) or not isinstance(part.get("top10s"), list) \
                or any(not isinstance(u, str) or not u for u in users_i):
            raise DataFormatError(f"{p}: its user list is not a list of user ids")
        totals.add((k, part.get("users_total"), part.get("run")))
        found[i] = {**part, "_path": p}
    if not found:
        raise DataFormatError(f"{d}: no partial results (result.shard-*-of-*.json) to merge")
    if len(totals) > 1:
        raise DataFormatError(f"{d}: partial results of different runs (shards, users, run): "
                              f"{sorted(totals, key=str)}; remove the stale ones")
    (k, users_total, run), = totals
    if run is None:
        raise DataFormatError(f"{d}: partial results without a run fingerprint (written by an older version); "
                              "run the shards again")
    missing = sorted(set(range(k)) - set(found))
    if missing:
        raise DataFormatError(f"{d}: missing shard(s) {missing} of {k}")
    top10s, users, expect = [], [], 0
    for i in range(k):
        part = found[i]
        if part.get("user_start") != expect or len(part["top10s"]) != len(part["user"]):
            raise DataFormatError(f"{part['_path']}: starts at user {part.get('user_start')}, expected {expect} "
                                  "(overlapping or repeated shards)")
        top10s += part["top10s"]
        users += part["user"]
        expect += len(part["user"])
    if expect != users_total:
        raise DataFormatError(f"{d}: shards hold {expect} users, the run had {users_total}")
    if len(set(users)) != len(users):
        raise DataFormatError(f"{d}: {len(users) - len(set(users))} user(s) appear in more than one place")
    out = d / out_name
    write_json(out, {"time": max(float(found[i].get("time", 0)) for i in range(k)), "top10s": top10s, "user": users},
               compact=True)
    return out


def build_parser() -> FlagParser:
    """genrec-merge: `python -m evalu.shard --result_dir R` merges R/result.shard-*-of-*.json into R/result.json."""
    p = FlagParser(description=build_parser.__doc__)
    p.add_argument("--result_dir", default=os.environ.get("EVAL_RESULT_PATH"),
                   help="folder of the partial results (env EVAL_RESULT_PATH)")
    add_logging_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    setup_logging(a)
    if not a.result_dir:
        p.error("--result_dir (or EVAL_RESULT_PATH) is required")

    def body() -> int:
        out = merge_shards(a.result_dir)
        print(f"merged -> {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
