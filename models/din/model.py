"""Deep Interest Network (Zhou et al. 2018, KDD, "Deep Interest Network for Click-Through Rate Prediction").

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
from modules.target_attention import TargetAttention


@dataclass
class DINConfig:
    """The ``model:`` section of a DIN run.

    Attributes:
        name: registry key (``din``).
        embedding_dim: D, the width of every embedding table.
        history_length: L, the most recent behaviours the target attends over.
        user_feature: scalar user id feature (None: no user embedding).
        target_features: scalar features of the target item, concatenated into the item vector.
        history_features: behaviour sequences aligned one to one with ``target_features`` (sharing their
            tables when the schema says so).
        attention_hidden: hidden widths of the local activation unit (paper: 80, 40).
        attention_softmax: softmax-normalise the activation weights (the paper does not; the official DARE
            code's DIN does).
        attention_factorized: compute the activation unit's first layer factorized (the same parameters and
            scores up to float rounding, cheaper: ``modules.target_attention.TargetAttention``).
        attention_top_k: attend over only the top K behaviours by the activation score (0: all; the official
            DARE code's DIN keeps the top 20 of 200).
        target_cross: also feed ``v_A * v_U(A)`` and ``v_A * mean_j e_j`` (element-wise) to the MLP (the
            official DARE code's ``use_cross_feature``).
        mlp_batch_norm: batch-normalise the MLP input (the official DARE code's main MLP starts with BatchNorm).
        mlp_hidden: hidden widths of the prediction MLP (paper: 200, 80).
        activation: activation of both MLPs (paper: PReLU or Dice).
        dropout: dropout after each hidden layer of the prediction MLP.
    """

    name: str = "din"
    embedding_dim: int = 16
    history_length: int = 50
    user_feature: Optional[str] = "user_id"
    target_features: list[str] = field(default_factory=lambda: ["item_id", "item_category"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    attention_softmax: bool = False
    attention_factorized: bool = False
    attention_top_k: int = 0
    target_cross: bool = False
    mlp_batch_norm: bool = False
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = Activation.prelu
    dropout: float = 0.0


class DIN(nn.Module):
    """DIN: the target item attends over the user's behaviours with the local activation unit (Eq. 3).

    ``logits = MLP([e_user, v_A, v_U(A), mean_j e_j])`` with ``v_U(A) = sum_j a(e_j, v_A) e_j`` over the most
    recent ``history_length`` behaviours ``e_j`` and ``v_A`` the target item; with ``target_cross`` the MLP also
    reads ``v_A * v_U(A)`` and ``v_A * mean_j e_j``, with ``mlp_batch_norm`` its input is batch-normalised.

    Args:
        cfg: the model config.
        schema: the data schema (tables, sharing, number of tasks T = ``len(schema.labels)``).
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: DINConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.embedding = UserTargetHistoryEmbedding(
            schema, cfg.user_feature, cfg.target_features, cfg.history_features, d, cfg.history_length, device
        )
        item = self.embedding.item_dim
        self.attention = TargetAttention(
            item, cfg.attention_hidden, activation=cfg.activation, softmax=cfg.attention_softmax,
            factorized=cfg.attention_factorized, top_k=cfg.attention_top_k, device=device,
        )
        self.target_cross = cfg.target_cross
        width = (d if cfg.user_feature is not None else 0) + (5 if cfg.target_cross else 3) * item
        self.norm: nn.Module = nn.BatchNorm1d(width, device=device) if cfg.mlp_batch_norm else nn.Identity()
        self.mlp = MLP(
            width, cfg.mlp_hidden, out_features=require_sample_labels(schema, "din"), activation=cfg.activation,
            dropout=cfg.dropout, device=device,
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns logits ``[B, T]``."""
        user, target, history, mask = self.embedding(batch.sparse_features)  # [B, D], [B, I], [B, L, I], [B, L]
        attended = self.attention(target, history, mask)  # [B, I]
        pooled = masked_mean(history, mask)  # [B, I]
        parts = [target, attended, pooled] if user is None else [user, target, attended, pooled]
        if self.target_cross:
            parts += [target * attended, target * pooled]
        return self.mlp(self.norm(torch.cat(parts, dim=-1)))  # [B, T]
