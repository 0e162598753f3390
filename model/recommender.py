"""The recommender: an item tower (id, sparse features, semantic ID, multimodal projections) and a causal
transformer over [user token, item tokens] whose output at step t is the query for item t+1.

Items are addressed by store slot (see dataset.store); the tower reads each slot's features from tables the
model holds as non-persistent buffers, so a candidate never seen in training is embedded from its features
and semantic ID the same way as a warm one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataset.store import FeatureSchema, ItemStore


@dataclass
class ModelConfig:
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    maxlen: int = 100
    feat_dim: int = 16  # width of each sparse-feature embedding
    temperature: float = 0.05
    num_negatives: int = 512  # random negatives per batch (plus up to as many in-batch positives)
    id_dropout: float = 0.2  # share of items whose id embedding is hidden in training: teaches the tower cold start
    # Levels of the semantic ID an item without an id embedding (cold, or id dropped in training) uses: fine levels
    # identify single items like an id does and carry noise for items never trained on; coarse ones generalise.
    sid_levels_without_id: int = 2
    use_item_id: bool = True
    use_semantic_ids: bool = True
    mm_emb_id: list[str] = field(default_factory=lambda: ["81"])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ItemTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        h, fd = cfg.hidden, cfg.feat_dim
        self.cfg, self.schema = cfg, schema
        self.id_emb = nn.Embedding(schema.num_items + 1, h, padding_idx=0) if cfg.use_item_id else None
        self.sparse = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.item_sparse.values())
        self.array = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.item_array.values())
        self.sid = (nn.ModuleList(nn.Embedding(schema.sid_codebook + 1, h, padding_idx=0)
                                  for _ in range(schema.sid_levels)) if cfg.use_semantic_ids else None)
        self.mm_proj = nn.ModuleDict({f: nn.Linear(d, h) for f, d in schema.mm.items() if f in cfg.mm_emb_id})
        width = (h if self.id_emb is not None else 0) + fd * (len(self.sparse) + len(self.array)) \
            + (h if self.sid is not None else 0) + h * len(self.mm_proj)
        self.out = nn.Sequential(nn.Linear(max(width, 1), h), nn.GELU(), nn.Linear(h, h))
        for name in ("t_reid", "t_sparse", "t_array", "t_sid"):
            self.register_buffer(name, torch.zeros(1, dtype=torch.long), persistent=False)
        self.t_mm: dict[str, torch.Tensor] = {}

    def set_store(self, store: ItemStore) -> None:
        """Point the tower at a store's per-slot feature tables (moved to the model's device)."""
        dev = self.out[0].weight.device
        slots = np.arange(store.num_slots)
        self.t_reid = torch.as_tensor(store.reid(slots), device=dev)
        self.t_sparse = torch.as_tensor(store.sparse, device=dev)
        self.t_array = torch.as_tensor(store.array, device=dev)
        self.t_sid = torch.as_tensor(store.sid, device=dev)
        self.t_mm = {f: torch.as_tensor(store.mm[f], device=dev) for f in self.mm_proj if f in store.mm}

    def forward(self, slots: torch.Tensor, drop_id: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        reid = self.t_reid[slots]
        if drop_id is not None:
            reid = reid.masked_fill(drop_id, 0)
        if self.id_emb is not None:
            parts.append(self.id_emb(reid))
        sp = self.t_sparse[slots]
        parts += [emb(sp[..., i]) for i, emb in enumerate(self.sparse)]
        if len(self.array):
            ar = self.t_array[slots]
            parts += [emb(ar[..., i, :]).sum(-2) / (ar[..., i, :] > 0).sum(-1, keepdim=True).clamp_min(1)
                      for i, emb in enumerate(self.array)]
        if self.sid is not None:
            codes = self.t_sid[slots]
            k = self.cfg.sid_levels_without_id
            if self.id_emb is not None and k < codes.shape[-1]:
                fine = torch.zeros_like(codes, dtype=torch.bool)
                fine[..., k:] = True
                codes = codes.masked_fill(fine & (reid == 0)[..., None], 0)
            parts.append(sum(emb(codes[..., i]) for i, emb in enumerate(self.sid)))
        for f, proj in self.mm_proj.items():
            if f in self.t_mm:
                parts.append(proj(self.t_mm[f][slots]))
        return self.out(torch.cat(parts, -1))


class UserTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        fd = cfg.feat_dim
        self.sparse = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.user_sparse.values())
        self.array = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.user_array.values())
        width = fd * (len(self.sparse) + len(self.array))
        self.out = nn.Linear(max(width, 1), cfg.hidden)

    def forward(self, user_sparse: torch.Tensor, user_array: torch.Tensor) -> torch.Tensor:
        parts = [emb(user_sparse[:, i]) for i, emb in enumerate(self.sparse)]
        for i, emb in enumerate(self.array):
            vals = user_array[:, i]
            parts.append(emb(vals).sum(1) / (vals > 0).sum(1, keepdim=True).clamp_min(1))
        if not parts:
            return self.out.bias.expand(user_sparse.shape[0], -1)
        return self.out(torch.cat(parts, -1))


class SharedDropout(nn.Module):
    """Dropout whose mask is shared over the time axis of [B, T, h] (variational dropout): one random number per
    sequence and channel instead of per token, which matters on CPUs where random numbers are slow."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, x.shape[2], device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block; dropout on the residual branches."""

    def __init__(self, h: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
        self.drop = SharedDropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, h)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Recommender(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        self.schema, self.cfg = schema, cfg
        h = cfg.hidden
        self.items = ItemTower(schema, cfg)
        self.user = UserTower(schema, cfg)
        self.pos = nn.Embedding(cfg.maxlen + 1, h)
        self.blocks = nn.ModuleList(Block(h, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(h)
        self.drop = SharedDropout(cfg.dropout)

    def item_vectors(self, slots: torch.Tensor, drop_id: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item vectors."""
        return F.normalize(self.items(slots, drop_id), dim=-1)

    def sequence(self, seq: torch.Tensor, user_sparse: torch.Tensor, user_array: torch.Tensor,
                 seq_vecs: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised query at every item position [B, L, h] (left-padded `seq` [B, L])."""
        B, L = seq.shape
        x = self.items(seq) if seq_vecs is None else seq_vecs
        x = torch.cat([self.user(user_sparse, user_array)[:, None], x], 1)
        x = self.drop(x + self.pos(torch.arange(L + 1, device=seq.device))[None])
        # A query attends to earlier non-padding tokens; the user token (position 0) is always visible.
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=seq.device), seq > 0], 1)
        causal = torch.tril(torch.ones(L + 1, L + 1, dtype=torch.bool, device=seq.device))
        mask = (causal[None] & keep[:, None, :])[:, None]  # [B, 1, L+1, L+1], True = may attend
        for blk in self.blocks:
            x = blk(x, mask)
        return F.normalize(self.norm(x)[:, 1:], dim=-1)

    def query(self, seq: torch.Tensor, user_sparse: torch.Tensor, user_array: torch.Tensor) -> torch.Tensor:
        """The query for the next item after each (left-padded) history [B, h]."""
        return self.sequence(seq, user_sparse, user_array)[:, -1]

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampled softmax (InfoNCE) of each next item against random and in-batch negatives, cosine / temperature."""
        seq, pos = batch["seq"], batch["pos"]
        dev = seq.device
        valid = pos > 0
        n_items = self.schema.num_items
        neg = torch.randint(1, n_items + 1, (self.cfg.num_negatives,), generator=generator).to(dev)
        inb = pos[valid]
        if len(inb) > self.cfg.num_negatives:
            inb = inb[torch.randperm(len(inb), generator=generator)[: self.cfg.num_negatives].to(dev)]
        # One tower pass over every distinct slot in the batch.
        uniq, inv = torch.unique(torch.cat([seq.flatten(), pos[valid], neg, inb]), return_inverse=True)
        drop = (torch.rand(len(uniq), generator=generator).to(dev) < self.cfg.id_dropout) if self.training else None
        vec = self.items(uniq, drop)
        n_seq, n_pos = seq.numel(), int(valid.sum())
        seq_vecs = vec[inv[:n_seq]].view(*seq.shape, -1)
        q = self.sequence(seq, batch["user_sparse"], batch["user_array"], seq_vecs)[valid]
        vnorm = F.normalize(vec, dim=-1)
        p_idx = inv[n_seq:n_seq + n_pos]
        n_idx = inv[n_seq + n_pos:]
        pos_logit = (q * vnorm[p_idx]).sum(-1, keepdim=True)
        neg_logit = q @ vnorm[n_idx].T
        neg_logit = neg_logit.masked_fill(n_idx[None, :] == p_idx[:, None], float("-inf"))  # accidental hits
        logits = torch.cat([pos_logit, neg_logit], 1) / self.cfg.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=dev))
