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

from dataset.datasets import ACTION_TOKENS, CLICK
from dataset.store import FeatureSchema, ItemStore

from .sid_embedding import SemanticIdEmbedding


@dataclass
class ModelConfig:
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    maxlen: int = 100
    feat_dim: int = 16  # width of each sparse-feature embedding
    temperature: float = 0.05
    # Negatives per step: this many uniform random items plus as many in-batch next items. A catalogue of at
    # most this many items is scored in full instead (exact softmax, no sampling).
    num_negatives: int = 2048
    logq: bool = True  # sampled negatives: subtract log(expected count) from each logit (sampling-bias correction)
    id_dropout: float = 0.2  # share of items whose id embedding is hidden in training: teaches the tower cold start
    sid_embedding: str = "prefix"  # "prefix": one table per prefix (c1..cl); "level": one per code cl
    sid_table_size: int = 1 << 18  # prefix mode: at most this many rows a level (more prefixes are hashed)
    sid_min_share: int = 1  # prefix mode: an item without id uses a prefix that at least this many other items share
    # Level mode only: levels of the semantic ID an item without an id embedding uses (fine levels identify single
    # items like an id does and are noise for items never trained on). Prefix mode decides per prefix instead.
    sid_levels_without_id: int = 2
    # A learnt logit bias per item (one more output of the item tower) beside the cosine: an item's popularity
    # need not be squeezed into its direction, and an item without an id gets the bias its content and
    # semantic-ID prefixes predict (learnt on the training items whose id is dropped).
    item_bias: bool = True
    # One learnt logit offset for items already in the user's sequence: negative where people rarely come back to
    # an item (MovieLens: a film is rated once), positive where they do. Served as part of the model's score
    # (`history_offset`); --filter-seen still removes such items outright.
    history_bias: bool = True
    # Train as --filter-seen serves: items already in the user's sequence are no negatives (the softmax runs over
    # the items that could be recommended). The next item itself is kept when it repeats one.
    mask_seen: bool = False
    use_item_id: bool = True
    use_semantic_ids: bool = True
    # Every history token carries its action (exposure, click, conversion, unknown): what the user chose, not only
    # what they were shown.
    action_embedding: bool = True
    # The query is conditioned on the action the next item is to be (FiLM on the sequence output, and a scale of the
    # item bias): in training the target's own action, at inference the eval dir's user_action_type.json, else click.
    action_query: bool = True
    # Generative head: predicts the next item's semantic ID code by code from the query (level l from the query and
    # the codes before l), trained jointly with the dense loss at `generative_weight`; `--retrieval generative` /
    # `hybrid` decode it with a beam constrained to the candidate pool's IDs.
    generative_head: bool = False
    generative_weight: float = 0.5
    mm_emb_id: list[str] = field(default_factory=lambda: ["81"])

    CHOICES = {"sid_embedding": ("prefix", "level")}  # for the CLI
    HELP = {"action_embedding": "each history token carries its action (exposure, click, conversion, unknown)",
            "action_query": "condition the query on the action the next item is to be (training: its own; "
                            "inference: user_action_type.json, else click)",
            "generative_head": "also learn to predict the next item's semantic ID code by code (for --retrieval "
                               "generative / hybrid at inference)",
            "generative_weight": "weight of the generative head's loss (the mean cross-entropy over the ID's levels) "
                                 "beside the dense loss"}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """From a dict of fields (a checkpoint's, migrated: see checkpoint.migrate); missing ones take the
        defaults, unknown ones are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def expected_negatives(target: torch.Tensor, n: int, k_random: int, n_items: int, k_inbatch: int) -> torch.Tensor:
    """Expected count of each of `n` items among the sampled negatives, given the batch: `k_random` uniform draws
    over `n_items` plus `k_inbatch` drawn from the batch's next items `target` (indices < n). Subtracting its log
    from the logits (logQ correction) makes the sampled softmax estimate the full one; without it the in-batch
    half pushes popular items down, as they are negatives more often than the full softmax implies."""
    freq = torch.bincount(target, minlength=n).float() * (k_inbatch / max(len(target), 1))
    return k_random / n_items + freq


class ItemTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        h, fd = cfg.hidden, cfg.feat_dim
        self.cfg, self.schema = cfg, schema
        self.id_emb = nn.Embedding(schema.num_items + 1, h, padding_idx=0) if cfg.use_item_id else None
        self.sparse = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.item_sparse.values())
        self.array = nn.ModuleList(nn.Embedding(v, fd, padding_idx=0) for v in schema.item_array.values())
        self.sid = (SemanticIdEmbedding(schema.sid_levels, schema.sid_codebook, h, cfg.sid_embedding,
                                        schema.sid_prefix_rows, cfg.sid_levels_without_id, cfg.sid_table_size,
                                        cfg.sid_min_share)
                    if cfg.use_semantic_ids else None)
        self.mm_proj = nn.ModuleDict({f: nn.Linear(d, h) for f, d in schema.mm.items() if f in cfg.mm_emb_id})
        width = (h if self.id_emb is not None else 0) + fd * (len(self.sparse) + len(self.array)) \
            + (h if self.sid is not None else 0) + h * len(self.mm_proj)
        self.out = nn.Sequential(nn.Linear(max(width, 1), h), nn.GELU(), nn.Linear(h, h + int(cfg.item_bias)))
        for name in ("t_reid", "t_sparse", "t_array", "t_sid_rows", "t_sid_drop", "t_codes"):
            self.register_buffer(name, torch.zeros(1, dtype=torch.long), persistent=False)
        self.t_mm: dict[str, torch.Tensor] = {}

    def set_store(self, store: ItemStore) -> None:
        """Point the tower at a store's per-slot feature tables (moved to the model's device)."""
        dev = self.out[0].weight.device
        slots = np.arange(store.num_slots)
        self.t_reid = torch.as_tensor(store.reid(slots), device=dev)
        self.t_sparse = torch.as_tensor(store.sparse, device=dev)
        self.t_array = torch.as_tensor(store.array, device=dev)
        if self.sid is not None:
            rows, drop = self.sid.index(store.sid, (slots > 0) & (slots <= self.schema.num_items))
            self.t_sid_rows, self.t_sid_drop = torch.as_tensor(rows, device=dev), torch.as_tensor(drop, device=dev)
            self.t_codes = torch.as_tensor(store.sid, device=dev)  # code + 1 per level, 0: none
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
            # Without any id embedding in the model, the semantic ID is every item's identity: nothing to hide.
            no_id = reid == 0 if self.id_emb is not None else torch.zeros_like(reid, dtype=torch.bool)
            parts.append(self.sid(self.t_sid_rows[slots], self.t_sid_drop[slots], no_id))
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


class GenerativeHead(nn.Module):
    """The next item's semantic ID, code by code: level l's logits from a state that starts as the query and adds
    an embedding of each code chosen before l (teacher-forced in training, the beam's codes at inference)."""

    def __init__(self, h: int, levels: int, codebook: int):
        super().__init__()
        self.levels, self.codebook = levels, codebook
        self.code_emb = nn.ModuleList(nn.Embedding(codebook, h) for _ in range(levels - 1))
        self.out = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, codebook))
                                 for _ in range(levels))

    def logits(self, state: torch.Tensor, level: int) -> torch.Tensor:
        return self.out[level](state)

    def step(self, state: torch.Tensor, level: int, code: torch.Tensor) -> torch.Tensor:
        """The state for level + 1 after choosing `code` at `level`."""
        return state + self.code_emb[level](code)

    def forward(self, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [N, levels, codebook] of the codes [N, levels] (0-based) after queries [N, h]."""
        state, out = q, []
        for level in range(self.levels):
            out.append(self.logits(state, level))
            if level + 1 < self.levels:
                state = self.step(state, level, codes[:, level])
        return torch.stack(out, 1)


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
        self.seen_logit = nn.Parameter(torch.zeros(())) if cfg.history_bias else None
        self.action_emb = nn.Embedding(ACTION_TOKENS, h, padding_idx=0) if cfg.action_embedding else None
        if self.action_emb is not None:  # zero at start: the item tokens are not drowned by a random N(0, 1) vector
            nn.init.zeros_(self.action_emb.weight)
        # Per target action: (scale - 1, shift) of the sequence output, and the item bias's weight - 1. Zero at
        # start: every action begins as the unconditioned query.
        self.action_film = nn.Embedding(ACTION_TOKENS, 2 * h + 1) if cfg.action_query else None
        if self.action_film is not None:
            nn.init.zeros_(self.action_film.weight)
        self.gen = GenerativeHead(h, schema.sid_levels, schema.sid_codebook) \
            if cfg.generative_head and cfg.use_semantic_ids else None

    def history_offset(self) -> float:
        """What to add to the retrieval score (`query` . `item_vectors`) of an item already in the user's
        sequence: the learnt logit offset in retrieval units (0 without `history_bias`)."""
        return float(self.seen_logit) * self.cfg.temperature if self.seen_logit is not None else 0.0

    def _unit_and_bias(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Item tower output -> (unit vector [..., h], logit bias [...] or None)."""
        h = self.cfg.hidden
        return F.normalize(raw[..., :h], dim=-1), (raw[..., h] if self.cfg.item_bias else None)

    def item_vectors(self, slots: torch.Tensor, drop_id: torch.Tensor | None = None) -> torch.Tensor:
        """Retrieval vectors: their inner product with `query` orders items as the training logits do. The unit
        vector, and with `item_bias` a last component temperature x bias (the query's is 1)."""
        v, b = self._unit_and_bias(self.items(slots, drop_id))
        return v if b is None else torch.cat([v, self.cfg.temperature * b[..., None]], -1)

    def sequence(self, seq: torch.Tensor, user_sparse: torch.Tensor, user_array: torch.Tensor,
                 seq_vecs: torch.Tensor | None = None, seq_action: torch.Tensor | None = None,
                 target_action: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised query at every item position [B, L, h] (left-padded `seq` [B, L], its actions `seq_action`
        as tokens, action + 1), and with `action_query` the item-bias weight [B, L] of each position's target
        action (`target_action` [B, L] tokens; default: a click)."""
        B, L = seq.shape
        x = self.items(seq)[..., :self.cfg.hidden] if seq_vecs is None else seq_vecs
        if self.action_emb is not None and seq_action is not None:
            x = x + self.action_emb(seq_action)
        x = torch.cat([self.user(user_sparse, user_array)[:, None], x], 1)
        x = self.drop(x + self.pos(torch.arange(L + 1, device=seq.device))[None])
        # A query attends to earlier non-padding tokens; the user token (position 0) is always visible.
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=seq.device), seq > 0], 1)
        causal = torch.tril(torch.ones(L + 1, L + 1, dtype=torch.bool, device=seq.device))
        mask = (causal[None] & keep[:, None, :])[:, None]  # [B, 1, L+1, L+1], True = may attend
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)[:, 1:]
        if self.action_film is None:
            return F.normalize(x, dim=-1), None
        if target_action is None:
            target_action = torch.full((B, L), CLICK + 1, dtype=torch.long, device=seq.device)
        film = self.action_film(target_action)
        h = self.cfg.hidden
        return F.normalize(x * (1 + film[..., :h]) + film[..., h:2 * h], dim=-1), 1 + film[..., 2 * h]

    def query(self, seq: torch.Tensor, user_sparse: torch.Tensor, user_array: torch.Tensor,
              seq_action: torch.Tensor | None = None, target_action: torch.Tensor | None = None) -> torch.Tensor:
        """The query for the next item after each (left-padded) history [B, h] (+1 with `item_bias`: the item
        bias's weight); `target_action` [B]: the action the next item is to be, as a token (default: a click)."""
        ta = target_action[:, None].expand(-1, seq.shape[1]) if target_action is not None else None
        q, w = self.sequence(seq, user_sparse, user_array, None, seq_action, ta)
        q = q[:, -1]
        if not self.cfg.item_bias:
            return q
        return torch.cat([q, w[:, -1:] if w is not None else torch.ones_like(q[:, :1])], -1)

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
             target_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax of each next item (cosine / temperature) over the whole catalogue when it has at most
        `num_negatives` items, else over random plus in-batch negatives (InfoNCE), logQ-corrected. With
        `target_weights` (one weight per action token), each next item's term is weighted by its action
        (`batch["pos_action"]`): the mean over the batch's weights."""
        seq, pos = batch["seq"], batch["pos"]
        dev = seq.device
        valid = pos > 0
        n_items, k = self.schema.num_items, self.cfg.num_negatives
        target = pos[valid]
        full = n_items <= k
        if full:
            neg = torch.arange(1, n_items + 1, device=dev)
        else:
            inb = target
            if len(inb) > k:
                inb = inb[torch.randperm(len(inb), generator=generator)[:k].to(dev)]
            neg = torch.cat([torch.randint(1, n_items + 1, (k,), generator=generator).to(dev), inb])
        # One tower pass over every distinct slot in the batch.
        uniq, inv = torch.unique(torch.cat([seq.flatten(), target, neg]), return_inverse=True)
        drop = (torch.rand(len(uniq), generator=generator).to(dev) < self.cfg.id_dropout) if self.training else None
        raw = self.items(uniq, drop)
        n_seq, n_pos = seq.numel(), len(target)
        seq_vecs = raw[inv[:n_seq], :self.cfg.hidden].view(*seq.shape, -1)
        q, bias_w = self.sequence(seq, batch["user_sparse"], batch["user_array"], seq_vecs, batch.get("seq_action"),
                                  batch.get("pos_action"))
        q = q[valid]
        w = target_weights[batch["pos_action"][valid]] if target_weights is not None else None
        vnorm, bias = self._unit_and_bias(raw)
        if bias is None:
            bias = torch.zeros(len(uniq), device=dev)
        bw = bias_w[valid][:, None] if bias_w is not None else 1.0  # each query's weight of the item bias
        p_idx, n_idx = inv[n_seq:n_seq + n_pos], inv[n_seq + n_pos:]
        mask = self.cfg.mask_seen
        first = _first_seen(inv[:n_seq].view(seq.shape), seq, len(uniq)) \
            if self.seen_logit is not None or mask else None
        if full:  # columns are items 1..n_items
            logits = q @ vnorm[n_idx].T / self.cfg.temperature + bw * bias[n_idx]
            if first is not None:
                seen = _seen(first, n_idx, seq.shape[1])[valid]
                if mask:
                    seen[torch.arange(len(target), device=dev), target - 1] = False
                    logits = logits.masked_fill(seen, float("-inf"))
                elif self.seen_logit is not None:
                    logits = logits + self.seen_logit * seen
            return _weighted_mean(F.cross_entropy(logits, target - 1, reduction="none"), w) \
                + self._generative_loss(q, target, w)
        pos_logit = (q * vnorm[p_idx]).sum(-1, keepdim=True) / self.cfg.temperature + bw * bias[p_idx, None]
        neg_logit = q @ vnorm[n_idx].T / self.cfg.temperature + bw * bias[n_idx][None, :]
        if first is not None:
            seen = _seen(first, n_idx, seq.shape[1])[valid]
            if mask:
                neg_logit = neg_logit.masked_fill(seen, float("-inf"))
            elif self.seen_logit is not None:
                b_idx, t_idx = valid.nonzero(as_tuple=True)
                pos_logit = pos_logit + self.seen_logit * (first[b_idx, p_idx] <= t_idx)[:, None]
                neg_logit = neg_logit + self.seen_logit * seen
        if self.cfg.logq:
            log_e = expected_negatives(p_idx, len(uniq), k, n_items, len(neg) - k).log()
            pos_logit = pos_logit - log_e[p_idx, None]
            neg_logit = neg_logit - log_e[n_idx][None, :]
        neg_logit = neg_logit.masked_fill(n_idx[None, :] == p_idx[:, None], float("-inf"))  # accidental hits
        logits = torch.cat([pos_logit, neg_logit], 1)
        return _weighted_mean(F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=dev),
                                              reduction="none"), w) + self._generative_loss(q, target, w)

    def _generative_loss(self, q: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """generative_weight x the (action-weighted) mean over targets with a semantic ID of the cross-entropy of
        their codes, averaged over the levels; 0 without the head."""
        if self.gen is None:
            return q.new_zeros(())
        codes = self.items.t_codes[target]  # code + 1, 0: none
        has = (codes > 0).all(1)
        if not bool(has.any()):
            return q.new_zeros(())
        logits = self.gen(q[has], codes[has] - 1)
        ce = F.cross_entropy(logits.flatten(0, 1), (codes[has] - 1).flatten(), reduction="none")
        return self.cfg.generative_weight * _weighted_mean(ce.view(-1, self.gen.levels).mean(1),
                                                           w[has] if w is not None else None)


def _weighted_mean(losses: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-target losses, weighted (0 when every weight is 0: such a batch teaches nothing)."""
    if w is None:
        return losses.mean()
    return (losses * w).sum() / w.sum().clamp_min(1e-12)


def _first_seen(seq_u: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """[B, L] index (< n) of each slot of the left-padded sequences `seq` [B, L] -> [B, n]: the first position at
    which each indexed item occurs in each sequence (L where it does not)."""
    B, L = seq.shape
    pos = torch.arange(L, device=seq.device).expand(B, L)
    first = torch.full((B, n), L, dtype=torch.long, device=seq.device)
    return first.scatter_reduce_(1, seq_u, torch.where(seq > 0, pos, L), "amin")


def _seen(first: torch.Tensor, cols: torch.Tensor, length: int) -> torch.Tensor:
    """`_first_seen`'s [B, n], column indices [C] -> [B, length, C]: whether item cols[c] is among seq[b, :t+1],
    the history the query at position t has read."""
    return first[:, None, cols] <= torch.arange(length, device=first.device)[None, :, None]
