"""DARE's decoupled embeddings (Feng et al. 2025, ICLR, "Long-Sequence Recommendation Models Need Decoupled
Embeddings", section 4): separate attention and representation tables for every behaviour-side feature.

Shapes: B batch, S behaviours in the batch, A = d_att * (number of item features), R = d_repr * (number of
item features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.schema import SchemaConfig
from modules.embedding import build_embedding_collection, concat_jagged, lookup_jagged


@dataclass
class ItemViews:
    """The target and its behaviours as the attention and the representation see them.

    Attributes:
        target_attn: ``[B, A]``.
        history_attn: ``[S, A]``.
        target_repr: ``[B, R]``.
        history_repr: ``[S, R]``.
        lengths: ``[B]`` history lengths.
    """

    target_attn: torch.Tensor
    history_attn: torch.Tensor
    target_repr: torch.Tensor
    history_repr: torch.Tensor
    lengths: torch.Tensor


def _check_layout(tables: int, attn_dim: int, repr_dim: int) -> None:
    """The table layouts DARE's Table 1 knows (:class:`DecoupledEmbedding`, :class:`DecoupledBuckets`)."""
    if tables not in (1, 2, 4):
        raise ValueError(f"tables must be 1, 2 or 4, got {tables}")
    if tables == 1 and attn_dim != repr_dim:
        raise ValueError(f"one shared table needs attn_dim == repr_dim, got {attn_dim} and {repr_dim}")


class DecoupledEmbedding(nn.Module):
    """The item features' tables, in one of three layouts (DARE Table 1):

    * ``tables=2`` (DARE): ``t_<table>__attn`` at ``attn_dim`` and ``t_<table>__repr`` at ``repr_dim`` for every
      feature; the target and its behaviours share each (``d_att = d_repr / 4`` works);
    * ``tables=1`` (TWIN's shared embedding): one ``t_<table>`` used by both (``attn_dim == repr_dim``);
    * ``tables=4`` (TWIN-4E): attention and representation tables, each separate for the target (roles
      ``attn_target``, ``repr_target``) and the behaviours (``attn``, ``repr``).

    Each role is its own EmbeddingCollection, so its tables are planned and sharded independently: the
    attention and representation tables of one feature may land on different ranks with different sharding
    types.

    Args:
        schema: the data schema.
        target_features: scalar item features of the target (item id first).
        history_features: the behaviour features aligned with them.
        attn_dim: d_att per feature.
        repr_dim: d_repr per feature.
        tables: 1, 2 or 4.
        device: where the tables are created (``meta`` allowed).
    """

    def __init__(
        self,
        schema: SchemaConfig,
        target_features: Sequence[str],
        history_features: Sequence[str],
        attn_dim: int,
        repr_dim: int,
        tables: int = 2,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        _check_layout(tables, attn_dim, repr_dim)
        self.tables = tables
        self.target_features = list(target_features)
        self.history_features = list(history_features)
        both = self.target_features + self.history_features
        if tables == 1:
            self.shared = build_embedding_collection(schema, both, attn_dim, device)
        elif tables == 2:
            self.attn = build_embedding_collection(schema, both, attn_dim, device, role="attn")
            self.repr = build_embedding_collection(schema, both, repr_dim, device, role="repr")
        else:
            self.attn = build_embedding_collection(schema, self.history_features, attn_dim, device, role="attn")
            self.repr = build_embedding_collection(schema, self.history_features, repr_dim, device, role="repr")
            self.attn_target = build_embedding_collection(
                schema, self.target_features, attn_dim, device, role="attn_target"
            )
            self.repr_target = build_embedding_collection(
                schema, self.target_features, repr_dim, device, role="repr_target"
            )
        self.attn_width = attn_dim * len(self.target_features)
        self.repr_width = repr_dim * len(self.target_features)

    def _views(self, target_ec: nn.Module, history_ec: nn.Module, kjt: KeyedJaggedTensor) -> tuple:
        if target_ec is history_ec:
            e = lookup_jagged(target_ec, kjt, self.target_features + self.history_features)
            t = e
        else:
            t = lookup_jagged(target_ec, kjt, self.target_features)
            e = lookup_jagged(history_ec, kjt, self.history_features)
        target = torch.cat([t[f].values() for f in self.target_features], dim=-1)  # [B, W]
        history = concat_jagged([e[f] for f in self.history_features])  # values [S, W]
        return target, history

    def forward(self, kjt: KeyedJaggedTensor) -> ItemViews:
        if self.tables == 1:
            t, h = self._views(self.shared, self.shared, kjt)
            return ItemViews(t, h.values(), t, h.values(), h.lengths())
        if self.tables == 2:
            ta, ha = self._views(self.attn, self.attn, kjt)
            tr, hr = self._views(self.repr, self.repr, kjt)
        else:
            ta, ha = self._views(self.attn_target, self.attn, kjt)
            tr, hr = self._views(self.repr_target, self.repr, kjt)
        return ItemViews(ta, ha.values(), tr, hr.values(), ha.lengths())


class DecoupledBuckets(nn.Module):
    """A bucketed behaviour feature (DARE's time embedding: the log2 bucket of the time since the behaviour) as
    decoupled tables in the layout of :class:`DecoupledEmbedding`: ``attn`` at ``attn_dim`` and ``repr`` at
    ``repr_dim`` (``tables=2``), one shared table (``tables=1``), or four (``tables=4``: target and behaviour
    apart). Its few rows (one per bucket) are dense parameters, replicated like the MLP.

    :meth:`extend` appends its columns to the item views: ``A`` grows by ``attn_dim`` and ``R`` by
    ``repr_dim``, so the attention reads only the attention bucket table and the representation only the
    representation one (the two gradients stay apart, as for the item tables).

    Args:
        buckets: rows of each table.
        attn_dim: width of the attention table(s).
        repr_dim: width of the representation table(s).
        tables: 1, 2 or 4 (as :class:`DecoupledEmbedding`).
        device: where the tables are created (``meta`` allowed).
    """

    def __init__(self, buckets: int, attn_dim: int, repr_dim: int, tables: int = 2,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check_layout(tables, attn_dim, repr_dim)
        self.tables, self.attn_dim, self.repr_dim = tables, attn_dim, repr_dim
        roles = {1: ["shared"], 2: ["attn", "repr"], 4: ["attn", "repr", "attn_target", "repr_target"]}[tables]
        for role in roles:
            width = repr_dim if role.startswith("repr") else attn_dim
            setattr(self, role, _UniformEmbedding(buckets, width, device=device))

    def _pair(self, kind: str) -> tuple[nn.Embedding, nn.Embedding]:
        """(target table, behaviour table) of ``kind`` (``attn`` or ``repr``)."""
        if self.tables == 1:
            return self.shared, self.shared
        if self.tables == 2:
            return getattr(self, kind), getattr(self, kind)
        return getattr(self, f"{kind}_target"), getattr(self, kind)

    def extend(self, views: ItemViews, target_bucket: torch.Tensor, history_bucket: torch.Tensor) -> ItemViews:
        """``views`` with the bucket embeddings appended (``target_bucket [B]``, ``history_bucket [S]``)."""
        (ta, ha), (tr, hr) = self._pair("attn"), self._pair("repr")
        return ItemViews(
            target_attn=torch.cat([views.target_attn, ta(target_bucket)], dim=-1),
            history_attn=torch.cat([views.history_attn, ha(history_bucket)], dim=-1),
            target_repr=torch.cat([views.target_repr, tr(target_bucket)], dim=-1),
            history_repr=torch.cat([views.history_repr, hr(history_bucket)], dim=-1),
            lengths=views.lengths,
        )


class _UniformEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised like a torchrec table, uniform in ``+-1/sqrt(rows)`` (DMP materialises meta
    modules through ``reset_parameters``)."""

    def reset_parameters(self) -> None:
        bound = 1.0 / self.num_embeddings**0.5
        nn.init.uniform_(self.weight, -bound, bound)
