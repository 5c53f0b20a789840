"""The average-pooling baseline: DIN's inputs with the behaviours mean-pooled instead of attended.

Shapes: B batch, L history length, D embedding dim, I = D * (number of item features), T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from models.common import UserTargetHistoryEmbedding, require_sample_labels
from modules.mlp import MLP, Activation
from modules.sequence import masked_mean


@dataclass
class AvgPoolConfig:
    """The ``model:`` section of an avg-pool baseline run.

    Attributes:
        name: registry key (``avgpool``).
        embedding_dim: D, the width of every embedding table.
        history_length: L, the most recent behaviours pooled.
        user_feature: scalar user id feature (None: no user embedding).
        target_features: scalar features of the target item, concatenated into the item vector.
        history_features: behaviour sequences aligned one to one with ``target_features``.
        mlp_hidden: hidden widths of the prediction MLP.
        activation: activation of the MLP.
        dropout: dropout after each hidden layer of the MLP.
    """

    name: str = "avgpool"
    embedding_dim: int = 16
    history_length: int = 50
    user_feature: Optional[str] = "user_id"
    target_features: list[str] = field(default_factory=lambda: ["item_id", "item_category"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = Activation.prelu
    dropout: float = 0.0


class AvgPoolLastN(nn.Module):
    """Embedding & MLP baseline (Zhou et al. 2018, DIN, Sec. 4.2 "Base Model"): last-N mean pooling.

    ``logits = MLP([e_user, v_A, mean_j e_j])`` over the most recent ``history_length`` behaviours ``e_j``.

    Args:
        cfg: the model config.
        schema: the data schema (tables, sharing, number of tasks T = ``len(schema.labels)``).
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: AvgPoolConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.embedding = UserTargetHistoryEmbedding(
            schema, cfg.user_feature, cfg.target_features, cfg.history_features, d, cfg.history_length, device
        )
        item = self.embedding.item_dim
        width = (d if cfg.user_feature is not None else 0) + 2 * item
        self.mlp = MLP(
            width, cfg.mlp_hidden, out_features=require_sample_labels(schema, "avgpool"), activation=cfg.activation,
            dropout=cfg.dropout, device=device,
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns logits ``[B, T]``."""
        user, target, history, mask = self.embedding(batch.sparse_features)  # [B, D], [B, I], [B, L, I], [B, L]
        pooled = masked_mean(history, mask)  # [B, I]
        parts = [target, pooled] if user is None else [user, target, pooled]
        return self.mlp(torch.cat(parts, dim=-1))  # [B, T]
