"""Feature schema and the item store: every item the model may see gets a slot with all its features as arrays.

Slot 0 is padding, slots 1..num_items are the training items (slot == item re-id), later slots are items
unseen in training (cold candidates, unseen history items) registered by creative id. The model looks items up
by slot, so a cold item is embedded from its features and semantic ID exactly like a warm one.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from .mm_emb import MMEmbedding

log = logging.getLogger(__name__)

USER_SPARSE = ("103", "104", "105", "109")
USER_ARRAY = ("106", "107", "108", "110")
ITEM_SPARSE = ("100", "101", "102", "111", "112", "114", "115", "116", "117", "118", "119", "120", "121", "122")


@dataclass
class FeatureSchema:
    """Which features exist and their vocabulary sizes (re-ids + padding 0). Saved with every checkpoint."""

    num_items: int
    num_users: int
    user_sparse: dict[str, int] = field(default_factory=dict)
    user_array: dict[str, int] = field(default_factory=dict)
    item_sparse: dict[str, int] = field(default_factory=dict)
    item_array: dict[str, int] = field(default_factory=dict)
    mm: dict[str, int] = field(default_factory=dict)  # fid -> dim
    sid_levels: int = 4
    sid_codebook: int = 256
    array_len: int = 8  # user array features are truncated/padded to this length
    sid_prefix_rows: list[int] = field(default_factory=list)  # semantic-ID prefixes of the training items, per level

    @classmethod
    def from_indexer(cls, indexer: Mapping, mm_dims: Mapping[str, int] | None = None,
                     item_feats: Mapping[str, Mapping] | None = None, **kw: Any) -> "FeatureSchema":
        """Vocabularies from the indexer. Item features are the competition's sparse ones plus any other non-user
        feature; one whose values are lists in `item_feats` is an array feature."""
        f = indexer["f"]
        vocab = {str(k): len(v) + 1 for k, v in f.items()}
        user = set(USER_SPARSE) | set(USER_ARRAY)
        item = [k for k in ITEM_SPARSE if k in vocab] + sorted(k for k in vocab if k not in user and k not in ITEM_SPARSE)
        arrays = set()
        for feats in list((item_feats or {}).values())[:1000]:
            arrays |= {k for k, v in feats.items() if isinstance(v, list)}
        return cls(
            num_items=max(indexer["i"].values(), default=0), num_users=max(indexer["u"].values(), default=0),
            user_sparse={k: vocab[k] for k in USER_SPARSE if k in vocab},
            user_array={k: vocab[k] for k in USER_ARRAY if k in vocab},
            item_sparse={k: vocab[k] for k in item if k not in arrays},
            item_array={k: vocab[k] for k in item if k in arrays},
            mm=dict(mm_dims or {}), **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSchema":
        return cls(**d)


def sparse_value(v: Any, vocab: int) -> int:
    """A feature value as a re-id: strings (unseen in training), None, out-of-range -> 0; lists -> first element."""
    if isinstance(v, list):
        v = v[0] if v else 0
    if type(v) is not int or v < 0 or v >= vocab:
        return 0
    return v


def array_value(v: Any, vocab: int, length: int) -> list[int]:
    vals = v if isinstance(v, list) else [v]
    out = [sparse_value(x, vocab) for x in vals[:length]]
    return out + [0] * (length - len(out))


class ItemStore:
    """Per-slot arrays: reid, creative id, sparse and array features, semantic ID (code + 1, 0 = none), mm."""

    def __init__(self, schema: FeatureSchema, indexer: Mapping, item_feats: Mapping[str, Mapping]):
        self.schema = schema
        n = schema.num_items + 1
        self.creative = np.zeros(n, np.int64)
        for cid, reid in indexer["i"].items():
            if 0 < reid < n:
                self.creative[reid] = int(cid)
        self.sparse = np.zeros((n, len(schema.item_sparse)), np.int64)
        self.array = np.zeros((n, len(schema.item_array), schema.array_len), np.int64)
        for key, feats in item_feats.items():
            try:
                reid = int(key)
            except ValueError:
                continue
            if 0 < reid < n and isinstance(feats, dict):
                sp, ar = self._features(feats)
                self.sparse[reid] = sp
                if ar:
                    self.array[reid] = ar
        self._extra_cids: list[int] = []
        self._extra_feats: list[tuple[list[int], list[list[int]]]] = []
        self._slot_of_cid: dict[int, int] = {}
        self.sid = np.zeros((n, schema.sid_levels), np.int64)
        self.mm: dict[str, np.ndarray] = {}

    @property
    def num_slots(self) -> int:
        return len(self.creative) + len(self._extra_cids)

    def slot_for(self, creative_id: int, feats: Mapping | None) -> int:
        """Slot of an item unseen in training (registered once per creative id, first features win)."""
        slot = self._slot_of_cid.get(creative_id)
        if slot is None:
            slot = self.num_slots
            self._slot_of_cid[creative_id] = slot
            self._extra_cids.append(int(creative_id))
            self._extra_feats.append(self._features(feats or {}))
        return slot

    def _features(self, feats: Mapping) -> tuple[list[int], list[list[int]]]:
        s = self.schema
        return ([sparse_value(feats.get(k, 0), v) for k, v in s.item_sparse.items()],
                [array_value(feats.get(k, [0]), v, s.array_len) for k, v in s.item_array.items()])

    def finalize(self, sids: Mapping[int, list[int]], mm: Mapping[str, MMEmbedding]) -> "ItemStore":
        """Fold registered extra slots into the arrays and (re)attach semantic IDs and mm embeddings."""
        if self._extra_cids:
            self.creative = np.concatenate([self.creative, np.asarray(self._extra_cids, np.int64)])
            sp = np.asarray([f[0] for f in self._extra_feats], np.int64).reshape(-1, self.sparse.shape[1])
            ar = np.asarray([f[1] for f in self._extra_feats], np.int64).reshape(len(self._extra_feats), *self.array.shape[1:])
            self.sparse, self.array = np.concatenate([self.sparse, sp]), np.concatenate([self.array, ar])
            self._extra_cids, self._extra_feats = [], []
        self.attach_semantic_ids(sids)
        self.mm = {}
        for fid, dim in self.schema.mm.items():
            arr = np.zeros((self.num_slots, dim), np.float32)
            feat = mm.get(fid)
            if feat is not None and feat.dim == dim:
                rows = feat.rows(self.creative)
                rows[0] = -1
                hit = rows >= 0
                arr[hit] = feat.emb[rows[hit]]
            elif feat is not None:
                log.warning("mm feature %s has dim %d, the model expects %d: using zeros", fid, feat.dim, dim)
            self.mm[fid] = arr
        return self

    def attach_semantic_ids(self, sids: Mapping[int, list[int]]) -> int:
        """Set each slot's codes from `sids` (by creative id); returns how many slots got one."""
        L = self.schema.sid_levels
        self.sid = np.zeros((self.num_slots, L), np.int64)
        if not sids:
            return 0
        keys = np.fromiter(sids.keys(), np.int64, len(sids))
        codes = np.asarray([c[:L] for c in sids.values()], np.int64).reshape(len(sids), L)
        order = np.argsort(keys)
        keys = keys[order]
        pos = np.searchsorted(keys, self.creative).clip(0, len(keys) - 1)
        hit = keys[pos] == self.creative
        hit[0] = False  # padding slot
        self.sid[hit] = codes[order[pos[hit]]] + 1
        return int(hit.sum())

    def reid(self, slots: np.ndarray) -> np.ndarray:
        """Item re-id of each slot (0 for items unseen in training)."""
        return np.where(slots <= self.schema.num_items, slots, 0)
