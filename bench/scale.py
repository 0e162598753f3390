"""Benchmark: inference's embedding and retrieval stages at the competition's shape, 1 process against N
(torch.distributed, gloo, one thread each), with the same split and gather code as `torchrun evalu/infer.py`.

The world is made in memory in seconds: a small model is trained once on a demo world (its schema: features,
vocabularies, semantic-ID prefixes), then N new candidates get random features, a 32-d multimodal vector and a
semantic ID, and U users random histories of the training items. No JSON is written: the stages timed are the
ones that grow with the catalogue (candidate embedding, user embedding, exact top-10), and they are checked to
give the same top-10 in every configuration.

    python bench/scale.py [--candidates 200000 --users 10000 --procs 1 2]
    python bench/scale.py --curve 100000 400000 1600000 3600000 --users 1000   # every stage, growing catalogue
    python bench/scale.py --curve 100000 1000000 --users 1000 --io_dim 1024
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from genrec.core.alloc import tune_allocator  # noqa: E402
from genrec.core.cli import FlagParser  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report  # noqa: E402


class FakeStore:
    """What ItemStore gives the item tower, for `n_new` random candidates after the training items."""

    def __init__(self, schema, n_new: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = schema.num_items + 1 + n_new
        self.num_slots = n
        self.num_items = schema.num_items
        self.sparse = np.stack([rng.integers(0, v, n) for v in schema.item_sparse.values()], 1) \
            if schema.item_sparse else np.zeros((n, 0), np.int64)
        self.array = np.zeros((n, len(schema.item_array), schema.array_len), np.int64)
        self.sid = rng.integers(1, schema.sid_codebook + 1, (n, schema.sid_levels))  # stored as code + 1
        self.mm = {f: rng.standard_normal((n, d), dtype=np.float32) for f, d in schema.mm.items()}

    def reid(self, slots: np.ndarray) -> np.ndarray:
        return np.where(slots <= self.num_items, slots, 0)


def _model(work: Path):
    """A model trained once (1 epoch) on a small demo world, cached in `work`."""
    from dataset.synth import SynthConfig, generate
    from genrec.recommender.checkpoint import is_checkpoint, load_checkpoint
    from genrec.recommender.trainer import TrainConfig, train

    ck = work / "ck"
    if not is_checkpoint(ck):
        generate(work / "train", SynthConfig(users=500, test_users=10, items=2000, mm=((81, 32),)))
        train(TrainConfig(data_dir=str(work / "train"), output_dir=str(ck), epochs=1))
    return load_checkpoint(ck).model


def _stages(rank: int, world: int, port: int, work: str, n_cand: int, n_users: int, out: dict) -> None:
    """One process of a configuration: the embedding and retrieval stages exactly as evalu/infer.py runs them."""
    import evalu.shard as shard
    from genrec.core import dist as rdist
    from evalu.retrieval import topk_scored

    tune_allocator()  # a spawned process: as infer's run does
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    d = shard.init(torch.device("cpu"))
    model = _model(Path(work))
    model.eval()
    store = FakeStore(model.schema, n_cand)
    model.items.set_store(store)
    slots = np.arange(model.schema.num_items + 1, store.num_slots)
    rng = np.random.default_rng(1)
    seqs = rng.integers(1, model.schema.num_items + 1, (n_users, model.cfg.maxlen))
    us = np.zeros((n_users, len(model.schema.user_sparse)), np.int64)
    ua = np.zeros((n_users, len(model.schema.user_array), model.schema.array_len), np.int64)
    qb = 512
    rdist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        c_lo, c_hi = shard.span(len(slots), d.world, d.rank, shard.CAND_CHUNK)
        mine = [model.item_vectors(torch.as_tensor(slots[lo:min(lo + shard.CAND_CHUNK, c_hi)]))
                for lo in range(c_lo, c_hi, shard.CAND_CHUNK)]
        cand = rdist.gather_rows(torch.cat(mine) if mine else torch.zeros(0, model.cfg.hidden + 1))
        u_lo, u_hi = shard.span(n_users, d.world, d.rank, qb)
        q = torch.cat([model.query(torch.as_tensor(seqs[b:min(b + qb, u_hi)]), torch.as_tensor(us[b:min(b + qb, u_hi)]),
                                   torch.as_tensor(ua[b:min(b + qb, u_hi)])) for b in range(u_lo, u_hi, qb)])
        t1 = time.perf_counter()
        _, idx, _ = topk_scored(q, cand, 10, user_chunk=shard.topk_user_chunk(qb))  # as infer.py: --score_dtype auto
        idx = rdist.gather_rows(idx)
        t2 = time.perf_counter()
    if d.lead:
        import resource

        out.update(embed=t1 - t0, retrieve=t2 - t1, checksum=int(idx.sum()), first=idx[:3].tolist(),
                   peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rdist.close()


def _io_stages(work: Path, n: int, n_users: int, dim: int) -> dict:
    """The stages around the model at n candidates: loading their `dim`-d embeddings from the binary cache (as
    every run after the first does), the bootstrap encoding them with an RQ-VAE (as inference does with the
    checkpoint's), and writing result.json for n_users users."""
    import json

    from dataset.mm_emb import CACHE_VERSION, _source_signature, load_feature
    from genrec.core.safeio import write_json
    from rqvae import RQVAEConfig, encode, fit

    rng = np.random.default_rng(2)
    emb = work / f"io_{n}_{dim}" / "creative_emb"
    src = emb / f"emb_81_{dim}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "part-00000").write_text("")  # the cache's source (its rows come from the binary files below)
    cache = emb / ".genrec_cache"
    cache.mkdir(exist_ok=True)
    stem = f"emb_81_{dim}"
    with open(cache / f"{stem}.f32", "wb") as f:
        for lo in range(0, n, 262144):
            f.write(rng.standard_normal((min(262144, n - lo), dim), dtype=np.float32).tobytes())
    np.arange(1, n + 1, dtype=np.int64).tofile(cache / f"{stem}.ids.i64")
    (cache / f"{stem}.meta.json").write_text(json.dumps({"version": CACHE_VERSION, "fid": "81", "dim": dim, "n": n,
                                                         "sources": _source_signature([src / "part-00000"]),
                                                         "skipped": {}}))
    t0 = time.perf_counter()
    feat = load_feature(emb, "81")
    x = np.array(feat.emb)  # every value read once (a copy out of the memory map)
    t1 = time.perf_counter()
    model, _ = fit(x[:20000], RQVAEConfig(device="cpu", num_epochs=1))  # a checkpoint's RQ-VAE stand-in
    t2 = time.perf_counter()
    encode(model, x)
    t3 = time.perf_counter()
    top = rng.integers(1, n + 1, (n_users, 10)).tolist()
    write_json(work / "result.json", {"time": 0, "top10s": top, "user": [f"user_{i}" for i in range(n_users)]},
               compact=True)
    t4 = time.perf_counter()
    import shutil

    shutil.rmtree(emb.parent)
    return {"load": t1 - t0, "bootstrap": t3 - t2, "write": t4 - t3}


def _run(world: int, work: str, n_cand: int, n_users: int) -> dict:
    import torch.multiprocessing as mp

    if world == 1:
        out: dict = {}
        _stages(0, 1, 0, work, n_cand, n_users, out)
        return out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_stages, args=(world, port, work, n_cand, n_users, out), nprocs=world, join=True)
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    tune_allocator()  # as infer does (GENREC_NO_MALLOC_TUNING=1: glibc's defaults)
    p = FlagParser(description=__doc__)
    p.add_argument("--candidates", type=int, default=200_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare (first = baseline)")
    p.add_argument("--curve", type=int, nargs="*", default=[],
                   help="candidate counts for the growth curve (1 process), instead of the comparison")
    p.add_argument("--io_dim", type=int, default=32, help="width of the embeddings the curve loads and encodes")
    p.add_argument("--work", help="keep the trained model here (default: a temp dir)")
    a = p.parse_args(argv)
    say = Report()
    work = a.work or tempfile.mkdtemp(prefix="bench_scale_")
    _model(Path(work))  # train once, before any timing
    say(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, one thread per process")
    if a.curve:
        torch.set_num_threads(1)
        say(f"\n## growth with the catalogue: {a.users} users, 1 process, {a.io_dim}-d embeddings\n")
        say("| candidates | load embeddings (cache) s | bootstrap (encode) s | candidate + user embedding s | "
              "retrieval s | write result.json s | s per 100k candidates | peak RSS MiB |")
        say("|---|---|---|---|---|---|---|---|")
        for n in a.curve:
            io = _io_stages(Path(work), n, a.users, a.io_dim)
            r = _run(1, work, n, a.users)
            total = io["load"] + io["bootstrap"] + r["embed"] + r["retrieve"] + io["write"]
            say(f"| {n:,} | {io['load']:.2f} | {io['bootstrap']:.2f} | {r['embed']:.2f} | {r['retrieve']:.2f} | "
                  f"{io['write']:.2f} | {total / n * 1e5:.3f} | {r['peak_mb']:.0f} |", flush=True)
        say.write("scale-curve", "Inference stages as the catalogue grows")
        return
    say(f"\n## {a.candidates:,} candidates x {a.users:,} users\n")
    say("| processes | candidate + user embedding s | retrieval s | total s | vs 1 process | same top-10 |")
    say("|---|---|---|---|---|---|")
    base = None
    for n in a.procs:
        r = _run(n, work, a.candidates, a.users)
        total = r["embed"] + r["retrieve"]
        base = base or (total, r["checksum"], r["first"])
        same = r["checksum"] == base[1] and r["first"] == base[2]
        say(f"| {n} | {r['embed']:.2f} | {r['retrieve']:.2f} | {total:.2f} | {base[0] / total:.2f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)

    say.write("scale", "Inference past one process")

if __name__ == "__main__":
    main()
