"""RecBole's sequential models as peers, run here on exactly our split (needs the ml100k extra).

Our split folder (warm: every item appears in training) is written as a RecBole atomic file whose timestamps are
each user's interaction ranks, so RecBole's leave-one-out by time (`LS: valid_and_test`, order `TO`) holds out
exactly our targets: the last interaction for the test, the one before for validation (ties in the raw
timestamps are already broken the way our converter broke them). Training uses RecBole's own trainer epoch by
epoch; evaluation is ours, from the model's full-sort scores over every item, under two rules:

  unfiltered   every item ranked (RecBole's default for sequential models: it masks no history for them)
  filtered     items of the user's history set to -inf before ranking (as our --filter-seen)

Validation picks the best epoch under each rule separately (the competition score, 0.31 HR@10 + 0.69 NDCG@10,
as our trainer does), and the test figures of a rule come from that rule's best epoch.

    python bench/peers.py --split DIR [--models SASRec GRU4Rec --seeds 0 --max-epochs 50 --time-budget 600]
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genrec.core.cli import FlagParser  # noqa: E402
from dataset import load_labels  # noqa: E402
from dataset.seqfile import SeqFile  # noqa: E402
from genrec.recommender.metrics import rank_metrics, target_ranks  # noqa: E402

# Each peer: RecBole model class name and the overrides of its packaged defaults (none but dropout).
PEERS = {
    "SASRec (dropout 0.2)": ("SASRec", {"hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2}),
    "SASRec (dropout 0.5)": ("SASRec", {"hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5}),
    "GRU4Rec": ("GRU4Rec", {}),
}


def write_atomic(split_dir: str | Path, out_root: str | Path, name: str = "split") -> dict[str, list[int]]:
    """`out_root/name/name.inter` from the split's test view (history in predict_seq.jsonl + the label), items by
    raw creative id, timestamps = rank in the user's sequence. Returns {user: creative ids in order, target last}."""
    split_dir, folder = Path(split_dir), Path(out_root) / name
    folder.mkdir(parents=True, exist_ok=True)
    labels = load_labels(split_dir / "labels.jsonl")
    seq = SeqFile(split_dir / "predict_seq.jsonl", split_dir / "predict_seq_offsets.pkl")
    from dataset import load_indexer
    cid_of = {v: k for k, v in load_indexer(split_dir / "indexer.pkl")["i"].items()}
    sequences = {}
    with open(folder / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for i in range(len(seq)):
            recs = seq[i]
            user = str(recs[0][0])
            items = [(r[5], n, r[1]) for n, r in enumerate(recs) if r[1] is not None]
            items.sort()
            cids = [int(cid_of.get(it, it)) for _, _, it in items]  # re-id -> creative id; unseen items are raw
            if user not in labels:
                continue
            cids.append(int(labels[user][0]))
            sequences[user] = cids
            f.writelines(f"{user}\t{c}\t{t}\n" for t, c in enumerate(cids))
    seq.close()
    return sequences


@torch.no_grad()
def _ranks(model, loader, n_items: int, history: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluated user: 1-based rank of the target unfiltered, and with the items of the user's whole history
    (`history` [users, L], RecBole ids, 0-padded; not only the model's last MAX_ITEM_LIST_LENGTH) filtered."""
    model.eval()
    ranks_u, ranks_f = [], []
    for interaction, _, positive_u, positive_i in loader:
        interaction = interaction.to(device)
        s = model.full_sort_predict(interaction).view(-1, n_items).float()
        t = torch.zeros(s.shape[0], dtype=torch.long, device=device)
        t[positive_u.to(device)] = positive_i.to(device)
        r_u, r_f = target_ranks(s, t, history[interaction[model.USER_ID]].to(device))  # the rules ours validates by
        ranks_u.append(r_u.cpu())
        ranks_f.append(r_f.cpu())
    return torch.cat(ranks_u).numpy(), torch.cat(ranks_f).numpy()


def _histories(ds, sequences: dict[str, list[int]], drop_last: int) -> torch.Tensor:
    """[users, L] RecBole item ids of each user's sequence without its last `drop_last` items, 0-padded."""
    uid, iid = ds.field2token_id["user_id"], ds.field2token_id["item_id"]
    rows = {uid[u]: [iid[str(c)] for c in cids[:len(cids) - drop_last]] for u, cids in sequences.items()}
    out = torch.zeros(ds.user_num, max((len(r) for r in rows.values()), default=1), dtype=torch.long)
    for u, r in rows.items():
        out[u, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _numpy2_aliases() -> None:
    """RecBole 1.2.1 (the latest release) assigns np.float = np.float_ etc. in its Config; numpy 2 removed those
    names. Alias them to what they always meant so its Config can be built."""
    for old, new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_")):
        if old not in np.__dict__:
            setattr(np, old, getattr(np, new))


def run_peer(label: str, atomic_root: Path, name: str, seed: int, sequences: dict[str, list[int]], max_epochs: int = 50,
             time_budget: float = 600.0, patience: int = 10, device: str = "cpu") -> dict:
    """Train one RecBole model, choosing the epoch per rule on validation; test both rules."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_seed

    _numpy2_aliases()
    cls_name, overrides = PEERS[label]
    tmp = tempfile.mkdtemp(prefix="recbole_")
    conf = {"data_path": str(atomic_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
            "train_neg_sample_args": None, "loss_type": "CE", "seed": seed, "reproducibility": True,
            "use_gpu": device != "cpu", "device": device, "show_progress": False, "checkpoint_dir": tmp,
            "epochs": max_epochs, "state": "ERROR", "log_wandb": False, "worker": 0, **overrides}
    config = Config(model=cls_name, dataset=name, config_dict=conf)
    init_seed(seed, True)
    logging.getLogger().setLevel(logging.ERROR)
    ds = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, ds)
    init_seed(seed, True)
    model = get_model(cls_name)(config, train_data.dataset).to(config["device"])
    cwd = os.getcwd()
    os.chdir(tmp)  # RecBole's Trainer opens a tensorboard folder in the working directory
    try:
        trainer = Trainer(config, model)
    finally:
        os.chdir(cwd)
    dev = torch.device(config["device"])
    n_items = ds.item_num
    hist_valid, hist_test = _histories(ds, sequences, 2), _histories(ds, sequences, 1)
    best = {"unfiltered": (-1.0, None, 0), "filtered": (-1.0, None, 0)}
    t0, epoch, since_best = time.perf_counter(), 0, 0
    while epoch < max_epochs and time.perf_counter() - t0 < time_budget and since_best < patience:
        epoch += 1
        model.train()
        trainer._train_epoch(train_data, epoch)
        ru, rf = _ranks(model, valid_data, n_items, hist_valid, dev)
        improved = False
        for rule, r in (("unfiltered", ru), ("filtered", rf)):
            sc = rank_metrics(r)["score"]
            if sc > best[rule][0]:
                best[rule] = (sc, copy.deepcopy(model.state_dict()), epoch)
                improved = True
        since_best = 0 if improved else since_best + 1
    seconds = time.perf_counter() - t0
    out = {"model": label, "seed": seed, "epochs": epoch, "seconds": round(seconds, 1),
           "stopped_by": "patience" if since_best >= patience else ("epochs" if epoch >= max_epochs else "time")}
    for rule in ("unfiltered", "filtered"):
        model.load_state_dict(best[rule][1])
        ru, rf = _ranks(model, test_data, n_items, hist_test, dev)
        out[rule] = {**rank_metrics(ru if rule == "unfiltered" else rf), "best_epoch": best[rule][2]}
    # Do RecBole's test targets equal ours? Map its internal tokens back to raw ids.
    tok_user, tok_item = ds.field2id_token["user_id"], ds.field2id_token["item_id"]
    agree = total = 0
    for interaction, _, positive_u, positive_i in test_data:
        for u, i in zip(interaction["user_id"][positive_u].tolist(), positive_i.tolist()):
            total += 1
            agree += int(sequences.get(str(tok_user[u]), [None])[-1] == int(tok_item[i]))
    out["targets_agree"], out["test_users"] = agree, total
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = FlagParser(description=__doc__)
    p.add_argument("--split", required=True, help="a warm split folder in our format")
    p.add_argument("--models", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max_epochs", type=int, default=50)
    p.add_argument("--time_budget", type=float, default=600.0, help="seconds of training per model and seed")
    p.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better validation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="append one JSON line per run here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sequences = write_atomic(a.split, tmp)
        res = []
        for seed in a.seeds:  # seed-major: a stopped run still has whole seeds
            for m in a.models:
                r = run_peer(m, Path(tmp), "split", seed, sequences, a.max_epochs, a.time_budget, a.patience)
                print(json.dumps(r), flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
                res.append(r)
    return res


if __name__ == "__main__":
    main()
