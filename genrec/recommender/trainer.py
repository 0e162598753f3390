"""Training the recommender (the logic behind `python train.py`).

Semantic IDs: the training dir's `semantic_id_dict.json` is used when present (with the RQ-VAE files beside it,
if any); otherwise an RQ-VAE is trained on the spot. Either way the checkpoint carries the IDs and the RQ-VAE,
so inference encodes new items with the same codebooks.

Nothing is written into the output folder until the end: the run works in a sibling staging folder (its IDs, its
RQ-VAE, after each epoch the best-so-far checkpoint and the training state: model, optimiser, random streams,
epoch), which replaces the output folder in one rename when training ends. An interrupted run leaves the old
checkpoint as it was; `--resume` continues it from its last finished epoch.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import TrainDataset
from dataset.datasets import ACTION_NAMES
from genrec.core import dist as rdist
from genrec.core.cli import (CliError, add_dataclass_arguments, check_number, check_whole, from_namespace, parse_bool,
                             progress_disabled)
from genrec.core.device import resolve_device
from genrec.core.lock import file_lock
from genrec.core.safeio import atomic_open, is_writable_dir
from rqvae import RQVAE, RQVAEConfig, generate_semantic_ids
from rqvae.config import METHODS

from .checkpoint import publish, staging_dir, write_checkpoint
from .metrics import rank_metrics, target_ranks, target_weights
from .recommender import ModelConfig, Recommender
from .sid_embedding import PrefixVocab

log = logging.getLogger(__name__)


def parse_target_weights(text: str) -> dict[int, float]:
    """--target_weights: "0:0.1,1:1,2:2.5" -> {action: weight} for exposure 0, click 1, conversion 2 (an action
    left out weighs 1; unknown actions take the exposure's weight). Weights are finite and >= 0, a click's > 0."""
    out = {0: 1.0, 1: 1.0, 2: 1.0}
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        key, sep, val = part.partition(":")
        try:
            k, v = int(key), float(val)
        except ValueError:
            k, v = -1, float("nan")
        if not sep or k not in out or not (0 <= v < float("inf")):
            raise ValueError(f"--target_weights {text!r}: want ACTION:WEIGHT pairs like 0:0.1,1:1,2:2.5 (actions 0, 1, 2; "
                             "weights >= 0)")
        out[k] = v
    if out[1] <= 0:
        raise ValueError(f"--target_weights {text!r}: a click's weight must be > 0 (clicks are what is ranked)")
    return out


def _weights_arg(text: str) -> str:
    try:
        parse_target_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


@dataclass
class TrainConfig:
    data_dir: str = ""
    output_dir: str = ""
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    sid_mm_emb_id: list[str] | None = None  # features the RQ-VAE merges when IDs must be made (default: mm_emb_id)
    sid_method: str = "rqvae"  # how IDs are made when the data dir has none: rqvae | rqkmeans (RQVAEConfig.method)
    # Validation rule, and what infer.py does by default: True ranks without the items of the user's history,
    # False ranks every item, None (auto) keeps the best epoch under each rule and then the rule that validates
    # better.
    filter_seen: bool | None = None
    # Sequences longer than maxlen + 1 train on a window ending at a random position each epoch (false: always
    # the last window, and the items before it are never a training target).
    random_window: bool = True
    # The log's actions: false trains the action-blind model (no action inputs, every next item a target of
    # weight 1), for data without actions and for the ablation.
    use_actions: bool = True
    # Weight of each next item in the loss by its action (exposure 0, click 1, conversion 2; unknown takes the
    # exposure's): the task ranks the next click or conversion, and most of the log is exposures.
    target_weights: str = "0:0.1,1:1,2:2.5"
    # Continue the interrupted run whose state is in the output folder's staging folder (same settings; more
    # epochs allowed).
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        check_whole(self, "epochs")
        check_whole(self, "batch_size")
        check_number(self, "lr", positive=True)
        check_number(self, "weight_decay")
        check_number(self.model, "generative_weight")
        if self.sid_method not in METHODS:
            raise ValueError(f"sid_method must be one of {METHODS}, got {self.sid_method!r}")
        if isinstance(self.filter_seen, str):  # the Python API may say it as the flag does
            try:
                self.filter_seen = None if self.filter_seen.strip().lower() == "auto" else parse_bool(self.filter_seen)
            except ValueError as e:
                raise ValueError(f"filter_seen: {e}, or auto") from None
        if self.filter_seen not in (None, True, False):
            raise ValueError(f"filter_seen must be true, false or None (auto), got {self.filter_seen!r}")
        parse_target_weights(self.target_weights)

    def model_config(self) -> ModelConfig:
        """The model to build: `model`, without its action inputs when `use_actions` is off."""
        if self.use_actions:
            return self.model
        return replace(self.model, action_embedding=False, action_query=False)

    def action_weights(self) -> torch.Tensor | None:
        """The loss weight of each action token (padding 0, exposure, click, conversion, unknown); None (every
        next item weighs 1) when `use_actions` is off."""
        if not self.use_actions:
            return None
        w = parse_target_weights(self.target_weights)
        return torch.tensor([0.0, w[0], w[1], w[2], w[0]])

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "TrainConfig":
        """The flags given; every other field takes today's default (not ModelConfig.from_dict, whose missing
        fields mean an old checkpoint's behaviour)."""
        return from_namespace(cls, a, model=from_namespace(ModelConfig, a))

    # For the CLI (genrec.core.cli.add_dataclass_arguments).
    CHOICES = {"sid_method": METHODS}
    ALIASES = {"epochs": ("num_epochs",)}  # train_rqvae.py says --num_epochs
    HELP = {"filter_seen": "validation rule and infer.py's default: rank without history items (true), all items "
                           "(false), or whichever validates better (auto)",
            "device": "auto (cuda when available), cpu, cuda",
            "random_window": "long sequences train on a window ending at a random position each epoch",
            "sid_mm_emb_id": "features for new semantic IDs (default: --mm_emb_id)",
            "sid_method": "how new semantic IDs are made when the data dir has none",
            "use_actions": "use the log's actions (false: the action-blind model, every next item a target of weight 1)",
            "target_weights": "loss weight of next items by action, ACTION:WEIGHT pairs (0 exposure, 1 click, "
                              "2 conversion; unknown actions take the exposure's)",
            "resume": "continue the interrupted run kept in the output folder's staging folder (.NAME.staging beside "
                      "it): same settings, more epochs allowed"}

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """train.py's flags: this config's fields and the model's, one flag each (data/output dirs aside)."""
        taken = {"data_dir", "output_dir"}
        add_dataclass_arguments(p, cls, skip={"model"}, taken=taken,
                                types={"target_weights": _weights_arg})
        add_dataclass_arguments(p, ModelConfig, taken=taken)


@torch.no_grad()
def evaluate(model: Recommender, val: dict[str, torch.Tensor], device: torch.device, batch: int = 512
             ) -> dict[str, dict]:
    """Full ranking of each held-out click or conversion among all training items (HR@10, NDCG@10, score; a
    conversion weighs 2.5), the query conditioned on the target's action, under both rules: "unfiltered" (every
    item, history items with the model's learnt offset) and "filtered" (items of the user's history removed; a
    target among them is a miss)."""
    model.eval()
    n_items = model.schema.num_items
    items = torch.cat([model.item_vectors(torch.arange(lo, min(lo + 65536, n_items + 1), device=device))
                       for lo in range(0, n_items + 1, 65536)])  # row r = slot r (row 0: padding)
    ranks: dict[str, list] = {"unfiltered": [], "filtered": []}
    offset = model.history_offset()
    mine = rdist.my_slice(len(val["target"]))  # under torchrun each rank ranks its share of the users
    for lo in range(mine.start, mine.stop, batch):
        hi = min(lo + batch, mine.stop)
        q = model.query(*(val[k][lo:hi].to(device) for k in ("seq", "user_sparse", "user_array", "seq_action",
                                                             "target_action")))
        r_u, r_f = target_ranks(q @ items.T, val["target"][lo:hi].to(device), val["history"][lo:hi].to(device), offset)
        ranks["unfiltered"].append(r_u.cpu())
        ranks["filtered"].append(r_f.cpu())
    model.train()
    weights = target_weights(val["target_action"].numpy() - 1)  # tokens -> actions
    out = {}
    for rule, r in ranks.items():
        mine_r = torch.cat(r) if r else torch.zeros(0, dtype=torch.long)
        out[rule] = rank_metrics(rdist.gather_rows(mine_r).numpy(), weights)
    return out


def _semantic_ids(ds: TrainDataset, cfg: TrainConfig, device: torch.device, stage: Path
                  ) -> tuple[RQVAE | None, list[str] | None]:
    """Make sure the training items have semantic IDs; return the RQ-VAE behind them (when known). IDs made here
    go to the staging folder `stage` (a resumed run finds them there)."""
    feats = [str(f) for f in (cfg.sid_mm_emb_id or cfg.model.mm_emb_id)]
    if ds.semantic_id_dict:
        src = ds.semantic_id_path.parent
        log.info("loaded semantic_id for %d items from %s", len(ds.semantic_id_dict), ds.semantic_id_path)
        if (src / RQVAE.MODEL_FILE).is_file() and (src / RQVAE.CONFIG_FILE).is_file():
            return RQVAE.load(src, device), _features_of(src, feats)
        log.warning("no RQ-VAE beside %s: inference cannot encode new items with the same codebooks",
                    ds.semantic_id_path)
        return None, None
    if (stage / SID_FILE).is_file() and (stage / RQVAE.MODEL_FILE).is_file():  # a resumed run's own
        ds.sid_dirs.append(stage)
        ds.rebuild()
        if ds.semantic_id_dict:
            log.info("loaded semantic_id for %d items made by the interrupted run", len(ds.semantic_id_dict))
            return RQVAE.load(stage, device), _features_of(stage, feats)
    out = stage  # never the data dir: every run (every seed) makes its own IDs
    log.info("no semantic_id found, training an RQ-VAE on features %s", feats)
    rq_cfg = RQVAEConfig(device=str(device), seed=cfg.seed, method=cfg.sid_method)
    sids, rq, _ = generate_semantic_ids(ds.data_dir, feats, rq_cfg, output_dir=out, data_parallel=rdist.world() > 1)
    if not sids:
        log.warning("training without semantic IDs: none could be generated")
        return None, None
    if rdist.is_lead():
        rq.save(out)
    ds.sid_dirs.append(out)
    ds.rebuild()
    return rq, feats


def _features_of(rq_dir: Path, default: list[str]) -> list[str]:
    """Features an RQ-VAE was trained on, from the report written beside it."""
    rep = rq_dir / "semantic_id_report.json"
    try:
        return list(json.loads(rep.read_text())["features"])
    except (OSError, ValueError, KeyError):
        return default


STATE_FILE, SID_FILE = "train_state.pt", "semantic_id_dict.json"


def _settings(cfg: TrainConfig) -> dict:
    """What a resumed run must share with the interrupted one (epochs may grow; workers and device may change)."""
    d = asdict(cfg)
    for k in ("epochs", "resume", "num_workers", "device", "output_dir"):
        d.pop(k)
    d["data_dir"] = str(Path(cfg.data_dir).resolve())
    return json.loads(json.dumps(d))  # tuples -> lists, as read back


def _load_state(stage: Path, cfg: TrainConfig) -> dict:
    path = stage / STATE_FILE
    if not path.is_file():
        raise CliError(f"--resume: no interrupted run to continue ({path} not found)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        theirs = json.loads(state["settings"])
    except Exception as e:  # noqa: BLE001 - untrusted bytes: one line whatever is wrong with them
        log.debug("%s", path, exc_info=True)
        raise CliError(f"--resume: {path} cannot be read ({type(e).__name__}); train without --resume") from None
    ours = _settings(cfg)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise CliError(f"--resume: the interrupted run used other settings ({', '.join(diff)}); give the same "
                       f"flags, or train without --resume")
    if state["epoch"] >= cfg.epochs:
        raise CliError(f"--resume: the interrupted run already finished {state['epoch']} epochs; ask for more "
                       f"(--epochs)")
    return state


def _save_state(stage: Path, cfg: TrainConfig, epoch: int, model: Recommender, opt: torch.optim.Optimizer,
                gen: torch.Generator, best: dict, history: list) -> None:
    with atomic_open(stage / STATE_FILE, "wb") as f:
        torch.save({"epoch": epoch, "settings": json.dumps(_settings(cfg)), "model": model.state_dict(),
                    "opt": opt.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "best": {r: {"score": b[0], "state": b[1], "metrics": json.dumps(b[2])} for r, b in best.items()
                             if b[1] is not None},
                    "history": json.dumps(history)}, f)


@torch.enable_grad()
def train(cfg: TrainConfig) -> Path:
    """Train and write the checkpoint folder; returns its path. Under torchrun every rank calls this; rank 0
    writes, holding the output folder's lock (a second training into it waits, then gives up)."""
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not is_writable_dir(out.parent) or (out.exists() and not is_writable_dir(out)):
        raise PermissionError(f"output dir {out} is not writable")
    if not rdist.is_lead():
        return _train(cfg, out, staging_dir(out))
    with file_lock(out.parent / f".{out.name}.lock", f"training into {out}"):
        return _train(cfg, out, staging_dir(out))


def _train(cfg: TrainConfig, out: Path, stage: Path) -> Path:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    state = _load_state(stage, cfg) if cfg.resume else None
    if rdist.is_lead() and state is None:
        if stage.exists():
            log.warning("%s holds an interrupted run: starting afresh (train.py --resume continues it)", stage)
            shutil.rmtree(stage)
        stage.mkdir()
    rdist.barrier()
    mc = cfg.model_config()
    ds = TrainDataset(cfg.data_dir, mm_emb_ids=mc.mm_emb_id, maxlen=mc.maxlen, random_window=cfg.random_window)
    rq, rq_feats = _semantic_ids(ds, cfg, device, stage) if mc.use_semantic_ids else (None, None)
    log.info("training on %d users, %d items, semantic-ID coverage %.1f%%", len(ds), ds.schema.num_items,
             100 * ds.semantic_id_coverage)
    schema, vocab = ds.schema, None
    if mc.use_semantic_ids and mc.sid_embedding == "prefix":
        vocab = PrefixVocab.build(ds.store.sid[1:schema.num_items + 1], schema.sid_codebook, mc.sid_table_size)
        schema = replace(schema, sid_prefix_rows=vocab.rows)
        log.info("semantic-ID prefixes of the training items per level: %s", vocab.rows)
    model = Recommender(schema, mc).to(device)
    if vocab is not None:
        model.items.sid.set_vocab(vocab)
    model.items.set_store(ds.store)
    gen = torch.Generator().manual_seed(cfg.seed + rdist.rank())  # ranks draw their own negatives
    sampler = None
    if rdist.world() > 1:  # data-parallel: every rank its share of the users each epoch, gradients averaged
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=rdist.world(), rank=rdist.rank(), shuffle=True, seed=cfg.seed)
    per_rank = -(-len(ds) // rdist.world())
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.num_workers, generator=gen if sampler is None else None,
                        drop_last=per_rank > cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    stats = ds.scan()
    val = stats.validation
    log.info("%.1f%% of the next items trained on repeat an item earlier in the sequence", 100 * stats.repeat_rate)
    log.info("interactions: %s; %s", ", ".join(f"{stats.actions[a]} {a}s" for a in ACTION_NAMES),
             f"next items weighted by action {cfg.target_weights}" if cfg.use_actions else
             "action-blind (--use_actions false): every next item a target of weight 1")
    weights = cfg.action_weights()
    weights = weights.to(device) if weights is not None else None
    rules = ("unfiltered", "filtered") if cfg.filter_seen is None else \
        (("filtered",) if cfg.filter_seen else ("unfiltered",))
    best = {r: (-1.0, None, {}) for r in rules}  # rule -> (score, state, metrics)
    history: list[dict] = []
    first = 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        for r, b in state["best"].items():
            best[r] = (b["score"], b["state"], json.loads(b["metrics"]))
        history = json.loads(state["history"])
        first = state["epoch"] + 1
        log.info("resuming the interrupted run in %s after epoch %d of %d", stage, state["epoch"], cfg.epochs)

    def info_now(rule: str, filter_seen: bool) -> dict:
        return {"data_dir": str(Path(cfg.data_dir).resolve()), "history": history, "best_val_score": best[rule][0],
                "filter_seen": filter_seen, "validation": {r: b[2] for r, b in best.items()},
                "repeat_rate": stats.repeat_rate, "actions": stats.actions,
                "seconds": round(time.perf_counter() - t0, 2), "world_size": rdist.world(),
                "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "resume")}}

    def best_rule() -> str:
        return max(rules, key=lambda r: best[r][0])

    @contextmanager
    def best_weights() -> Iterator[str]:
        """The model holds the best weights so far (of the rule validating best) inside the block."""
        rule = best_rule()
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if best[rule][1] is not None:
            model.load_state_dict(best[rule][1])
        try:
            yield rule
        finally:
            model.load_state_dict(current)

    ids = ds.semantic_id_dict if mc.use_semantic_ids else None
    for epoch in range(first, cfg.epochs + 1):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        tot, steps = 0.0, 0
        for batch in tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=progress_disabled()):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model.loss(batch, gen, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rdist.average_gradients(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += loss.item()
            steps += 1
        m = evaluate(model, val, device)
        history.append({"epoch": epoch, "loss": tot / max(steps, 1), **m})
        log.info("epoch %d/%d: loss %.4f, val HR@10 / NDCG@10 %.4f / %.4f, history filtered %.4f / %.4f (%d users)",
                 epoch, cfg.epochs, tot / max(steps, 1), m["unfiltered"]["hr@10"], m["unfiltered"]["ndcg@10"],
                 m["filtered"]["hr@10"], m["filtered"]["ndcg@10"], m["unfiltered"]["users"])
        for r in rules:
            if m[r]["score"] > best[r][0]:
                best[r] = (m[r]["score"], copy.deepcopy(model.state_dict()), {"epoch": epoch, **m[r]})
        if rdist.is_lead() and epoch < cfg.epochs:  # the best so far, and what --resume needs
            _save_state(stage, cfg, epoch, model, opt, gen, best, history)
            with best_weights() as rule:
                write_checkpoint(stage, model, {**info_now(rule, rule == "filtered"), "in_progress": True}, rq,
                                 rq_feats, ids)
    rule = best_rule()
    if best[rule][1] is not None:
        model.load_state_dict(best[rule][1])
    filter_seen = rule == "filtered"
    if cfg.filter_seen is None:
        log.info("history filtering %s: best validation score %.4f filtered vs %.4f unfiltered",
                 "on" if filter_seen else "off", best["filtered"][0], best["unfiltered"][0])
    info = info_now(rule, filter_seen)
    if rdist.world() > 1:  # data-parallel replicas must have stayed identical: one checksum per rank
        sums = rdist.gather_rows(torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None].cpu())
        info["replicas_identical"] = bool((sums == sums[0]).all())
        if not info["replicas_identical"]:
            log.warning("data-parallel replicas differ (parameter sums %s): the checkpoint is rank 0's", sums.tolist())
    if rdist.is_lead():  # one writer: the finished checkpoint replaces the output folder in one rename
        write_checkpoint(stage, model, info, rq, rq_feats, ids)
        (stage / STATE_FILE).unlink(missing_ok=True)
        publish(stage, out)
        log.info("saved checkpoint to %s (best val score %.4f)", out, best[rule][0])
    rdist.barrier()
    return out
