"""Embedding an item's semantic ID: one vector, the sum of one embedding per level.

Two ways to key level l:
- "prefix" (default): the prefix (c1, ..., cl), a prefix n-gram. Items that share a coarse prefix share its row,
  so a new item lands on rows that training items with similar content trained. Rows exist only for prefixes of
  training items (row 0, zero, for the rest): a prefix no training item has carries nothing learnt. A level
  with more than `cap` distinct prefixes is hashed into `cap` buckets first, so memory stays bounded.
- "level": the code cl alone, one table per level (what the first version did).

Items without an id embedding (cold ones, and training items whose id is dropped to teach cold start) must not
lean on rows that only they trained. In prefix mode a dropped training item loses the prefixes no other
training item shares (exactly the situation of a new item, whose unshared prefixes have no row); in level
mode items without an id keep the first `levels_without_id` levels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MODES = ("prefix", "level")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def prefix_values(codes: np.ndarray, codebook: int) -> np.ndarray:
    """[N, L] stored codes (code + 1; 0 = no ID) -> [N, L] int64 value of each prefix; -1 for items without an ID.
    Exact (c1 * K + c2 ...) while K^L fits in 63 bits, a rolling hash beyond."""
    c = codes.astype(np.int64) - 1
    out = np.empty_like(c)
    exact = codebook ** c.shape[1] < 2**62
    acc = np.zeros(len(c), np.uint64 if not exact else np.int64)
    with np.errstate(over="ignore"):
        for lvl in range(c.shape[1]):
            if exact:
                acc = acc * codebook + c[:, lvl]
            else:
                acc = (acc ^ c[:, lvl].astype(np.uint64)) * _GOLDEN
            out[:, lvl] = (acc >> np.uint64(1)).astype(np.int64) if not exact else acc
    out[(c < 0).any(1)] = -1
    return out


def _bucket(values: np.ndarray, cap: int) -> np.ndarray:
    """Fibonacci hashing of non-negative int64 values into [0, cap)."""
    with np.errstate(over="ignore"):
        return ((values.astype(np.uint64) * _GOLDEN) >> np.uint64(16)).astype(np.int64) % cap


@dataclass
class PrefixVocab:
    """Per level: the sorted distinct prefix keys of the training items and how many training items have each."""

    keys: list[np.ndarray]
    counts: list[np.ndarray]
    hashed: list[bool]

    @classmethod
    def build(cls, codes: np.ndarray, codebook: int, cap: int) -> "PrefixVocab":
        """From the stored codes [N, L] of the training items (rows without an ID are ignored)."""
        vals = prefix_values(codes, codebook)
        vals = vals[vals[:, 0] >= 0]
        keys, counts, hashed = [], [], []
        for lvl in range(codes.shape[1]):
            v = vals[:, lvl]
            h = len(np.unique(v)) > cap
            k, n = np.unique(_bucket(v, cap) if h else v, return_counts=True)
            keys.append(k)
            counts.append(n)
            hashed.append(h)
        return cls(keys, counts, hashed)

    @property
    def rows(self) -> list[int]:
        return [len(k) for k in self.keys]


class SemanticIdEmbedding(nn.Module):
    """codes -> rows of one flat table (row 0 = nothing), summed over levels."""

    def __init__(self, levels: int, codebook: int, dim: int, mode: str = "prefix",
                 prefix_rows: list[int] | None = None, levels_without_id: int = 2, cap: int = 1 << 18,
                 min_share: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"sid_embedding must be one of {MODES}, got {mode!r}")
        self.levels, self.codebook, self.mode, self.levels_without_id = levels, codebook, mode, levels_without_id
        self.cap = cap  # PrefixVocab.build's cap: hashed levels bucket with it
        self.min_share = min_share  # an item without id uses a prefix row only if this many other training items share it
        rows = list(prefix_rows or [0] * levels) if mode == "prefix" else [codebook] * levels
        if len(rows) != levels:
            raise ValueError(f"{len(rows)} prefix table sizes for {levels} levels")
        self.register_buffer("offsets", torch.as_tensor(np.concatenate([[1], 1 + np.cumsum(rows)[:-1]]), dtype=torch.long),
                             persistent=False)
        self.emb = nn.Embedding(1 + sum(rows), dim, padding_idx=0)
        if mode == "prefix":  # the vocabulary travels with the weights (state_dict), sized by the schema
            self.register_buffer("keys", torch.zeros(sum(rows), dtype=torch.long))
            self.register_buffer("counts", torch.zeros(sum(rows), dtype=torch.long))
            self.register_buffer("hashed", torch.zeros(levels, dtype=torch.bool))

    def set_vocab(self, vocab: PrefixVocab) -> None:
        if vocab.rows != (np.diff(np.append(self.offsets.cpu().numpy(), self.emb.num_embeddings))).tolist():
            raise ValueError("prefix vocabulary does not match the table sizes this module was built with")
        dev = self.keys.device
        self.keys = torch.as_tensor(np.concatenate(vocab.keys), dtype=torch.long, device=dev)
        self.counts = torch.as_tensor(np.concatenate(vocab.counts), dtype=torch.long, device=dev)
        self.hashed = torch.as_tensor(vocab.hashed, dtype=torch.bool, device=dev)

    def index(self, codes: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For stored codes [N, L] (code + 1, 0 = none) and whether each item was a training item [N]:
        (rows [N, L], droppable [N, L]: rows the item must not use when it has no id embedding)."""
        n, L = codes.shape
        if self.mode == "level":
            c = codes.astype(np.int64)
            rows = np.where(c > 0, self.offsets.cpu().numpy()[None, :] + c - 1, 0)
            drop = np.broadcast_to(np.arange(L) >= self.levels_without_id, (n, L))
            return rows, np.ascontiguousarray(drop)
        vals = prefix_values(codes, self.codebook)
        keys, counts = self.keys.cpu().numpy(), self.counts.cpu().numpy()
        offs = np.append(self.offsets.cpu().numpy(), self.emb.num_embeddings) - 1  # level l: keys[offs[l]:offs[l+1]]
        rows = np.zeros((n, L), np.int64)
        drop = np.zeros((n, L), bool)
        for lvl in range(L):
            k, cnt = keys[offs[lvl]:offs[lvl + 1]], counts[offs[lvl]:offs[lvl + 1]]
            if not len(k):
                continue
            v = vals[:, lvl]
            if bool(self.hashed[lvl]):
                v = np.where(v >= 0, _bucket(np.maximum(v, 0), self.cap), -1)
            pos = np.searchsorted(k, v).clip(0, len(k) - 1)
            hit = (k[pos] == v) & (v >= 0)
            rows[hit, lvl] = offs[lvl] + 1 + pos[hit]
            drop[:, lvl] = hit & (cnt[pos] - trained < self.min_share)  # too few other training items share it
        return rows, drop

    def forward(self, rows: torch.Tensor, drop: torch.Tensor, no_id: torch.Tensor) -> torch.Tensor:
        """rows, drop [..., L]; no_id [...]: items without an id embedding lose their droppable rows."""
        return self.emb(rows.masked_fill(drop & no_id[..., None], 0)).sum(-2)
