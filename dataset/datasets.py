"""Torch datasets over a competition directory: training sequences (with a held-out last click) and test users."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from genrec.core.safeio import DataFormatError, fits_int64

from .files import load_action_types, load_indexer, load_item_feats, load_predict_set
from .mm_emb import load_mm_emb
from .semantic_ids import CorruptSemanticIdFile, find_semantic_id_file, load_semantic_ids
from .seqfile import SeqFile
from .store import FeatureSchema, ItemStore, array_value, sparse_value

log = logging.getLogger(__name__)

# A record's action_type: exposure 0, click 1, conversion 2 (final round); anything else (null, 3, -1, "x") is unknown.
EXPOSURE, CLICK, CONVERSION, UNKNOWN = 0, 1, 2, 3
ACTION_NAMES = ("exposure", "click", "conversion", "unknown")
ACTION_TOKENS = len(ACTION_NAMES) + 1  # model inputs carry action + 1, so that 0 is padding


def action_of(value: Any) -> int:
    """A record's action_type as EXPOSURE / CLICK / CONVERSION, or UNKNOWN for any other value."""
    return value if type(value) is int and EXPOSURE <= value <= CONVERSION else UNKNOWN


def is_target(action: int) -> bool:
    """What the competition scores: a click or a conversion, never an exposure."""
    return action in (CLICK, CONVERSION)


def _warn_on_other_world(data_dir: Path, schema: FeatureSchema, indexer: Mapping, item_feats: Mapping) -> None:
    """The checkpoint's schema against this folder's indexer.pkl / item_feat_dict.json: they come from the
    training data, so any difference means files of another world (new items arrive by raw id and change
    neither). Ranked output would be poor, not wrong in form: a warning naming what differs."""
    here = FeatureSchema.from_indexer(indexer)
    diffs = []
    if here.num_items != schema.num_items:
        diffs.append(f"{here.num_items} items in indexer.pkl, {schema.num_items} in training")
    for kind in ("user_sparse", "user_array", "item_sparse", "item_array"):
        want = getattr(schema, kind)
        have = {**here.item_sparse, **here.item_array} if kind.startswith("item") else {**here.user_sparse, **here.user_array}
        diffs += [f"feature {f}: {have.get(f, 0) - 1} values here, {v - 1} in training" for f, v in want.items()
                  if have.get(f) != v]
    outside = sum(1 for k in item_feats if not (str(k).isdigit() and 0 < int(k) <= schema.num_items))
    if outside:
        diffs.append(f"{outside} items of item_feat_dict.json outside the training items")
    if diffs:
        log.warning("%s: indexer.pkl / item_feat_dict.json do not match the checkpoint's training data (%s%s): "
                    "files of another dataset? recommendations will be poor", data_dir, "; ".join(diffs[:5]),
                    f"; {len(diffs) - 5} more" if len(diffs) > 5 else "")


class _Base(Dataset):
    """Loads indexer, item features, mm embeddings and semantic IDs into an ItemStore."""

    def __init__(self, data_dir: str | os.PathLike, schema: FeatureSchema | None = None,
                 mm_emb_ids: Iterable[str] = ("81",), maxlen: int = 100,
                 sid_dirs: Iterable[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None,
                 sid_accept: Callable[[Path, dict[int, list[int]]], str | None] | None = None):
        """`sid_accept(path, ids)`: why an IDs file must not be used (None: use it); inference passes a check
        that the file belongs to the checkpoint's RQ-VAE. Refused files are listed in `semantic_id_rejected`."""
        self.data_dir = Path(data_dir)
        self.sid_accept = sid_accept
        self.semantic_id_rejected: list[tuple[Path, str]] = []
        self.odd_user_ids = 0
        self.maxlen = maxlen
        self.sid_dirs = [self.data_dir, *[Path(d) for d in sid_dirs]]
        self.indexer = load_indexer(self.data_dir / "indexer.pkl")
        wanted = list(schema.mm) if schema else [str(m) for m in mm_emb_ids]
        self.mm = load_mm_emb(self.data_dir / "creative_emb", wanted, cache_dir,
                              dims={f: int(d) for f, d in schema.mm.items()} if schema else None) if wanted else {}
        item_feats = load_item_feats(self.data_dir / "item_feat_dict.json")
        if schema is None:
            schema = FeatureSchema.from_indexer(self.indexer, {f: e.dim for f, e in self.mm.items()}, item_feats)
        else:
            _warn_on_other_world(self.data_dir, schema, self.indexer, item_feats)
        self.schema = schema
        self.store = ItemStore(schema, self.indexer, item_feats)
        self._user_raw: dict[int, str] | None = None
        self.semantic_id_dict: dict[int, list[int]] = {}
        self.semantic_id_path: Path | None = None
        self.semantic_id_error: str | None = None

    # --- semantic IDs -------------------------------------------------------------------------------
    def _load_semantic_ids(self) -> None:
        """The first readable `semantic_id_dict.json` among `sid_dirs`; corrupt ones are reported and skipped."""
        self.semantic_id_dict, self.semantic_id_path, self.semantic_id_error = {}, None, None
        self.semantic_id_rejected = []
        for d in self.sid_dirs:
            path = find_semantic_id_file(d)
            if path is None:
                continue
            try:
                ids, _ = load_semantic_ids(path, self.schema.sid_levels, self.schema.sid_codebook)
            except CorruptSemanticIdFile as e:
                log.warning("semantic IDs unusable: %s", e)
                self.semantic_id_error = str(e)
                continue
            why = self.sid_accept(path, ids) if self.sid_accept is not None else None
            if why:
                self.semantic_id_rejected.append((path, why))
                continue
            self.semantic_id_dict, self.semantic_id_path = ids, path
            return

    def _finalize(self) -> None:
        """Once, after every item slot is registered: feature arrays, mm embeddings and semantic IDs."""
        self._load_semantic_ids()
        self.store.finalize(self.semantic_id_dict, self.mm)

    def rebuild(self) -> "_Base":
        """Reload `semantic_id_dict.json` (after it was generated) and re-attach the IDs to every item; the
        other per-item arrays do not depend on it and stay as they are."""
        self._load_semantic_ids()
        self.store.attach_semantic_ids(self.semantic_id_dict)
        return self

    @property
    def semantic_id_coverage(self) -> float:
        """Share of non-padding item slots that have a semantic ID."""
        n = self.store.num_slots - 1
        return float((self.store.sid[1:, 0] > 0).sum() / n) if n > 0 else 0.0

    # --- one user's line ----------------------------------------------------------------------------
    def raw_user_id(self, uid: Any) -> str:
        """The raw user id of a record's user field: a string as is, a re-id through the indexer; anything else
        (a float, a list, an object) is written as its JSON text, so the user is still answered."""
        if isinstance(uid, str):
            return uid
        if type(uid) is not int:
            self.odd_user_ids += 1
            return json.dumps(uid, separators=(",", ":"))
        if self._user_raw is None:
            self._user_raw = {v: str(k) for k, v in self.indexer["u"].items()}
        return self._user_raw.get(uid, str(uid))

    def _user_features(self, feats: Mapping | None) -> tuple[np.ndarray, np.ndarray]:
        s = self.schema
        feats = feats or {}
        sparse = np.asarray([sparse_value(feats.get(f, 0), v) for f, v in s.user_sparse.items()], np.int64)
        arr = np.asarray([array_value(feats.get(f, [0]), v, s.array_len) for f, v in s.user_array.items()],
                         np.int64).reshape(len(s.user_array), s.array_len)
        return sparse, arr

    def _parse(self, records: list, register_unseen: bool) -> dict:
        """Profile features and the time-ordered interactions of one line, items as store slots."""
        profile, inter = None, []
        for r in records:
            uid, item, ufeat, ifeat, action, ts = r
            if ufeat is not None and item is None:
                profile = ufeat
            elif item is not None:
                inter.append((ts if isinstance(ts, (int, float)) else 0, item, ifeat, action))
        inter.sort(key=lambda t: t[0])
        n_items = self.schema.num_items
        slots, actions, unknown = [], [], 0
        for _, item, ifeat, action in inter:
            if type(item) is int and 0 < item <= n_items:
                slot = item
            elif register_unseen and type(item) is int and item > n_items and fits_int64(item):  # a raw creative id unseen in training
                slot = self.store.slot_for(item, ifeat if isinstance(ifeat, dict) else None)
            else:
                continue
            slots.append(slot)
            actions.append(action_of(action))
            unknown += actions[-1] == UNKNOWN
        sparse, arr = self._user_features(profile)
        return {"user": self.raw_user_id(records[0][0]) if records else "", "slots": slots, "actions": actions,
                "unknown_actions": unknown, "user_sparse": sparse, "user_array": arr}

    def _action_tokens(self, actions: list[int]) -> np.ndarray:
        """Actions as model inputs (action + 1), left-padded like the items they belong to."""
        return self._left_pad([a + 1 for a in actions])

    def _left_pad(self, xs: list[int]) -> np.ndarray:
        out = np.zeros(self.maxlen, np.int64)
        xs = xs[-self.maxlen:]
        if xs:
            out[-len(xs):] = xs
        return out


class TrainDataset(_Base):
    """Next-item training samples from `seq.jsonl`; each user's last click or conversion is held out for
    validation. Every next item is a sample, with its action (`pos_action`, as a token: action + 1) so that the
    loss can weigh it; the history carries each item's action too (`seq_action`).

    A sequence longer than maxlen + 1 yields a window of maxlen + 1 items ending at a random position each time
    it is read (`random_window`); else only its last maxlen next items would ever be trained on (38% of
    MovieLens-100k's interactions at maxlen 100)."""

    def __init__(self, data_dir: str | os.PathLike, random_window: bool = True, **kw: Any):
        super().__init__(data_dir, **kw)
        self.random_window = random_window
        self.seq = SeqFile(self.data_dir / "seq.jsonl", self.data_dir / "seq_offsets.pkl")
        self._finalize()

    def __len__(self) -> int:
        return len(self.seq)

    @staticmethod
    def _holdout(actions: list[int]) -> int | None:
        clicks = [i for i, a in enumerate(actions) if is_target(a)]
        return clicks[-1] if clicks and clicks[-1] > 0 else None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        u = self._parse(self.seq[i], register_unseen=False)
        cut = self._holdout(u["actions"])
        slots = u["slots"][:cut] if cut is not None else u["slots"]
        acts = u["actions"][:cut] if cut is not None else u["actions"]
        if self.random_window and len(slots) > self.maxlen + 1:
            end = int(torch.randint(self.maxlen + 1, len(slots) + 1, ()))  # torch: seeded per DataLoader worker
            slots, acts = slots[end - self.maxlen - 1:end], acts[end - self.maxlen - 1:end]
        return {"seq": torch.from_numpy(self._left_pad(slots[:-1])), "pos": torch.from_numpy(self._left_pad(slots[1:])),
                "seq_action": torch.from_numpy(self._action_tokens(acts[:-1])),
                "pos_action": torch.from_numpy(self._action_tokens(acts[1:])),
                "user_sparse": torch.from_numpy(u["user_sparse"]), "user_array": torch.from_numpy(u["user_array"])}

    def validation_samples(self, max_users: int | None = None) -> dict[str, torch.Tensor]:
        """History before each user's last click or conversion and that item as target (`target_action`: its
        action), for users that have one."""
        return self.scan(max_users).validation

    def scan(self, max_users: int | None = None) -> "TrainStats":
        """One pass over the training lines: validation samples and how often a next item repeats an earlier one."""
        seqs, seq_acts, targets, target_acts, us, ua, hists = [], [], [], [], [], [], []
        repeats = total = 0
        counts = np.zeros(len(ACTION_NAMES), np.int64)
        n = len(self) if max_users is None else min(len(self), max_users)
        for i in range(n):
            u = self._parse(self.seq[i], register_unseen=False)
            counts += np.bincount(u["actions"], minlength=len(ACTION_NAMES))
            cut = self._holdout(u["actions"])
            train = u["slots"][:cut] if cut is not None else u["slots"]
            seen: set[int] = set()
            for prev, t in zip(train[:-1], train[1:]):
                seen.add(prev)
                repeats += t in seen
            total += max(len(train) - 1, 0)
            if cut is None:
                continue
            seqs.append(self._left_pad(u["slots"][:cut]))
            seq_acts.append(self._action_tokens(u["actions"][:cut]))
            targets.append(u["slots"][cut])
            target_acts.append(u["actions"][cut] + 1)
            hists.append(np.unique(np.asarray(u["slots"][:cut], np.int64)))
            us.append(u["user_sparse"])
            ua.append(u["user_array"])
        width = max((len(h) for h in hists), default=1)
        history = np.zeros((len(hists), width), np.int64)
        for r, h in enumerate(hists):
            history[r, :len(h)] = h
        s = self.schema
        empty = torch.zeros(0, self.maxlen, dtype=torch.long)
        val = {"seq": torch.as_tensor(np.stack(seqs)) if seqs else empty,
               "seq_action": torch.as_tensor(np.stack(seq_acts)) if seq_acts else empty,
               "target": torch.as_tensor(targets, dtype=torch.long),
               "target_action": torch.as_tensor(target_acts, dtype=torch.long),
               "history": torch.as_tensor(history),
               "user_sparse": torch.as_tensor(np.stack(us)) if us else torch.zeros(0, len(s.user_sparse), dtype=torch.long),
               "user_array": torch.as_tensor(np.stack(ua)) if ua else torch.zeros(0, len(s.user_array), s.array_len, dtype=torch.long)}
        actions = dict(zip(ACTION_NAMES, counts.tolist()))
        if actions["unknown"]:
            log.warning("%s: %d interactions with an action_type other than 0, 1, 2 (null, or an unknown value): "
                        "read as unknown (never a target)", self.seq.path, actions["unknown"])
        return TrainStats(val, repeats / total if total else 0.0, actions)


@dataclass
class TrainStats:
    """What one pass over the training lines yields (TrainDataset.scan)."""

    # seq, seq_action, target, target_action, history (every earlier item, 0-padded), user features
    validation: dict[str, torch.Tensor]
    repeat_rate: float  # share of the next items trained on that are already earlier in the same sequence
    actions: dict[str, int]  # interactions by action: exposure, click, conversion, unknown


class TestDataset(_Base):
    """Test users of `predict_seq.jsonl` and the candidate pool of `predict_set.jsonl`, parsed once.

    Items unseen in training (history items given by raw creative id, cold candidates) get store slots with the
    features their records carry, so the model embeds them from features and semantic ID. Each user's target action
    (`target_actions`, as a token: action + 1) is the one `user_action_type.json` names (the final round's), else
    a click; `action_info` says what was read.
    """

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, data_dir: str | os.PathLike, **kw: Any):
        super().__init__(data_dir, **kw)
        seq = SeqFile(self.data_dir / "predict_seq.jsonl", self.data_dir / "predict_seq_offsets.pkl")
        self.users: list[str] = []
        seqs, seq_acts, us, ua, self.histories = [], [], [], [], []
        self.odd_user_ids = unknown = 0
        for i in range(len(seq)):
            try:
                u = self._parse(seq[i], register_unseen=True)
            except (TypeError, ValueError, AttributeError, OverflowError) as e:
                if isinstance(e, DataFormatError):
                    raise
                raise DataFormatError(f"{seq.path}: line {i + 1}: {type(e).__name__}: {e}") from None
            self.users.append(u["user"])
            seqs.append(self._left_pad(u["slots"]))
            seq_acts.append(self._action_tokens(u["actions"]))
            unknown += u["unknown_actions"]
            self.histories.append(np.unique(np.asarray(u["slots"], np.int64)))
            us.append(u["user_sparse"])
            ua.append(u["user_array"])
        seq.close()
        if self.odd_user_ids:
            log.warning("%s: %d users with an id that is neither a string nor an int: answered under the id's "
                        "JSON text", seq.path, self.odd_user_ids)
        if unknown:
            log.warning("%s: %d history interactions with an action_type other than 0, 1, 2: read as unknown",
                        seq.path, unknown)
        s = self.schema
        self.seqs = np.stack(seqs) if seqs else np.zeros((0, self.maxlen), np.int64)
        self.seq_actions = np.stack(seq_acts) if seq_acts else np.zeros((0, self.maxlen), np.int64)
        self.target_actions, self.action_info = self._target_actions()
        self.action_info["unknown_history_actions"] = unknown
        self.user_sparse = np.stack(us) if us else np.zeros((0, len(s.user_sparse)), np.int64)
        self.user_array = np.stack(ua) if ua else np.zeros((0, len(s.user_array), s.array_len), np.int64)
        pool = load_predict_set(self.data_dir / "predict_set.jsonl")
        self.candidates = pool
        reid_of = self.indexer["i"]
        self.candidate_slots = np.asarray(
            [reid_of.get(int(c), 0) or self.store.slot_for(int(c), f) for c, f in zip(pool.creative_ids, pool.features)],
            np.int64)
        self._finalize()

    def _target_actions(self) -> tuple[np.ndarray, dict]:
        """Per user, the target's action token: from user_action_type.json where it names the user with 1 or 2,
        else a click. A file that cannot be read costs only this (one warning): every user is then a click."""
        path = self.data_dir / "user_action_type.json"
        info: dict[str, Any] = {"file": path.is_file()}
        out = np.full(len(self.users), CLICK + 1, np.int64)
        try:
            types = load_action_types(path)
        except (DataFormatError, OSError) as e:
            log.warning("%s; every user's target is taken to be a click", e)
            return out, {**info, "error": str(e)}
        bad = 0
        for r, u in enumerate(self.users):
            if u not in types:
                continue
            a = action_of(types[u])
            if is_target(a):
                out[r] = a + 1
            else:
                bad += 1
        if bad:
            log.warning("%s: %d users with an action type other than 1 or 2: taken to be clicks", path, bad)
        info.update(conversions=int((out == CONVERSION + 1).sum()), clicks=int((out == CLICK + 1).sum()),
                    invalid=bad)
        return out, info

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"seq": torch.from_numpy(self.seqs[i]), "seq_action": torch.from_numpy(self.seq_actions[i]),
                "target_action": torch.as_tensor(self.target_actions[i]),
                "user_sparse": torch.from_numpy(self.user_sparse[i]), "user_array": torch.from_numpy(self.user_array[i])}
