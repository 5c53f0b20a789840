"""Feature plumbing shared by the target-attention CTR entries (DIN, the avg-pool baseline).

Shapes: B batch, L history length kept, S behaviours in the batch (sum of the history lengths), D embedding
dim, I = D * (number of item features).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from datasets.schema import SchemaConfig
from models.registry import TableConstraint, large_table_constraint
from modules.embedding import build_embedding_collection, concat_jagged, lookup_jagged
from modules.sequence import last_n


class UserTargetHistoryEmbedding(nn.Module):
    """Looks up the user, the target item and its most recent ``history_length`` behaviours.

    One EmbeddingCollection holds every table at width D; a target feature and its behaviour feature share
    a table when the schema says so (``IdFeature.table``). Item vectors are the concatenation of the item
    features' embeddings (``item_id`` ++ ``item_category``), for the target and for every behaviour alike.

    Args:
        schema: the data schema.
        user_feature: scalar user id feature (None: no user embedding).
        target_features: scalar features of the target item.
        history_features: sequence features of the behaviours, aligned with ``target_features`` (the i-th
            behaviour feature describes the same attribute as the i-th target feature) and with each other
            (equal lengths per row).
        dim: D.
        history_length: L, the most recent behaviours kept.
        device: where the tables are created (``meta`` allowed).
    """

    def __init__(
        self,
        schema: SchemaConfig,
        user_feature: Optional[str],
        target_features: Sequence[str],
        history_features: Sequence[str],
        dim: int,
        history_length: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not target_features or len(target_features) != len(history_features):
            raise ValueError(
                f"target_features {list(target_features)} and history_features {list(history_features)} must be"
                " non-empty and aligned one to one"
            )
        if history_length <= 0:
            raise ValueError(f"history_length must be > 0, got {history_length}")
        scalars = ([user_feature] if user_feature is not None else []) + list(target_features)
        for name in scalars:
            if schema.id_feature(name).sequence:
                raise ValueError(f"{name} must be a scalar id feature, the schema declares a sequence")
        for name in history_features:
            if not schema.id_feature(name).sequence:
                raise ValueError(f"{name} must be a sequence id feature, the schema declares a scalar")
        self.user_feature = user_feature
        self.target_features = list(target_features)
        self.history_features = list(history_features)
        self.history_length = history_length
        self.item_dim = dim * len(target_features)
        self.features = scalars + self.history_features
        self.ec = build_embedding_collection(schema, self.features, dim, device)

    def embed_jagged(self, features: KeyedJaggedTensor) -> tuple[Optional[torch.Tensor], torch.Tensor, JaggedTensor]:
        """Embeds a batch, keeping the history jagged (for models that search the whole history).

        Args:
            features: ``Batch.sparse_features`` (extra keys are ignored).

        Returns:
            ``(user [B, D] or None, target [B, I], history)``: ``history`` has values ``[S, I]`` (every
            behaviour the batch carries, oldest first per row, not only the last L: the reader's sequence cap
            is the only truncation) and lengths ``[B]``.
        """
        e = lookup_jagged(self.ec, features, self.features)
        user = e[self.user_feature].values() if self.user_feature is not None else None  # [B, D]
        target = torch.cat([e[f].values() for f in self.target_features], dim=-1)  # [B, I]
        history = concat_jagged([e[f] for f in self.history_features])  # values [S, I], lengths [B]
        return user, target, history

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeds a batch.

        Args:
            features: ``Batch.sparse_features`` (extra keys are ignored).

        Returns:
            ``(user [B, D] or None, target [B, I], history [B, L, I], mask [B, L])``; the history holds the
            most recent behaviours, oldest first, left-aligned, zero on padding slots (``mask`` False).
        """
        user, target, behaviours = self.embed_jagged(features)  # [B, D], [B, I], values [S, I]
        history, mask = last_n(behaviours.values(), behaviours.lengths(), self.history_length)  # [B, L, I], [B, L]
        return user, target, history, mask


def item_and_user_constraints(
    schema: SchemaConfig, user_feature: Optional[str], target_features: Sequence[str]
) -> Mapping[str, TableConstraint]:
    """Default sharding preferences: the (large) item-id and user tables go row-wise or table-wise.

    The item-id table is the first target feature's; the other tables (categories, small) are left to the
    planner. A ``mapping: mch`` table goes row-wise (:func:`models.registry.large_table_constraint`).
    """
    big = [target_features[0]] + ([user_feature] if user_feature is not None else [])
    return {schema.id_feature(name).table_name: large_table_constraint(schema, name) for name in big}


def require_sample_labels(schema: SchemaConfig, model: str) -> int:
    """The number of tasks T of a per-sample CTR model: the schema's ``labels`` (at least one).

    Raises:
        ValueError: the schema has only per-element ``sequence_labels`` (request-level data).
    """
    if not schema.labels:
        raise ValueError(
            f"{model} predicts per-sample labels, the schema has none (only sequence_labels "
            f"{[f.name for f in schema.sequence_labels]}); set data.schema.labels"
        )
    return len(schema.labels)


def history_caps(schema: SchemaConfig, history_features: Sequence[str], history_length: int) -> Mapping[str, int]:
    """Sequence caps of a model that reads the last ``history_length`` behaviours of ``history_features``.

    Raises:
        ValueError: the history features span several sequence groups.
    """
    groups = {schema.id_feature(name).group for name in history_features}
    if len(groups) != 1:
        raise ValueError(f"history features {list(history_features)} span several sequence groups: {sorted(groups)}")
    return {groups.pop(): history_length}


def check_search_features(
    schema: SchemaConfig,
    target_features: Sequence[str],
    history_features: Sequence[str],
    float_sequences: Sequence[Optional[str]],
    hard_search: Optional[tuple[str, str]] = None,
) -> None:
    """The feature checks shared by the search-based entries (TWIN / SIM, DARE).

    Args:
        target_features: the target's item features.
        history_features: the behaviours' item features, aligned with them.
        float_sequences: float sequence features the model reads (None entries are skipped).
        hard_search: ``(behaviour feature, target feature)`` of a hard search (None: no hard search).

    Raises:
        ValueError: naming the feature and what was expected.
    """
    if not target_features or len(target_features) != len(history_features):
        raise ValueError(f"target_features {list(target_features)} and history_features {list(history_features)} must align")
    floats = {f.name: f for f in schema.float_features}
    for name in float_sequences:
        if name is not None and (name not in floats or not floats[name].sequence):
            raise ValueError(f"{name} must be a float sequence feature of the schema, it has {sorted(floats)}")
    if hard_search is not None and (hard_search[0] not in history_features or hard_search[1] not in target_features):
        raise ValueError("search: hard needs hard_search_feature in history_features and hard_target_feature in target_features")
