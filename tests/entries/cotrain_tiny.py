"""Test entry ``cotrain_tiny``: two sub-models trained together over the same features (tests only, not a zoo
entry).

Sub-models A and B read the same id features, each through its own EmbeddingCollection whose tables carry a
role (``t_item_id__a`` / ``t_item_id__b``, ...), so that one train module holds two tables per feature: the
case the planner, per-table optimizer settings (``optim.tables``) and checkpoints must keep apart. The loss is
``bce_A + bce_B + kl_weight * KL_sym(A, B)`` (mutual learning); evaluation rows are model A's. Registered on
import (``imports: [tests.entries.cotrain_tiny]`` in a config).

Shapes: B batch, L history length kept, S behaviours in the batch, D embedding dim, I = D * (number of item
features), T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from models.base import TrainOutput, symmetric_kl, weighted_bce_loss
from models.common import history_caps, require_sample_labels
from models.registry import ModelSpec, register
from modules.embedding import build_embedding_collection, concat_jagged, lookup_jagged
from modules.mlp import MLP
from modules.sequence import last_n, masked_mean


@dataclass
class CotrainTinyConfig:
    """The ``model:`` section of a ``cotrain_tiny`` run.

    Attributes:
        name: registry key (``cotrain_tiny``).
        embedding_dim: D of both sub-models' tables.
        history_length: L, the most recent behaviours mean-pooled.
        user_feature: scalar user id feature.
        target_features: scalar features of the target item.
        history_features: behaviour sequences aligned one to one with ``target_features``.
        mlp_hidden: hidden widths of each sub-model's MLP.
        kl_weight: weight of the symmetric KL term between the two sub-models' predictions.
    """

    name: str = "cotrain_tiny"
    embedding_dim: int = 8
    history_length: int = 20
    user_feature: str = "user_id"
    target_features: list[str] = field(default_factory=lambda: ["item_id", "item_category"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    mlp_hidden: list[int] = field(default_factory=lambda: [32])
    kl_weight: float = 0.1


class PoolingTower(nn.Module):
    """One sub-model: ``MLP([e_user, v_target, mean_j e_j])`` over its own tables ``t_<feature>__<role>``.

    Args:
        cfg: the model config.
        schema: the data schema (table sizes and sharing).
        role: the tables' role (``a`` / ``b``).
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: CotrainTinyConfig, schema: SchemaConfig, role: str, device: Optional[torch.device]) -> None:
        super().__init__()
        if len(cfg.target_features) != len(cfg.history_features) or not cfg.target_features:
            raise ValueError("target_features and history_features must be non-empty and aligned one to one")
        d = cfg.embedding_dim
        self.cfg = cfg
        self.features = [cfg.user_feature, *cfg.target_features, *cfg.history_features]
        self.ec = build_embedding_collection(schema, self.features, d, device, role=role)
        item = d * len(cfg.target_features)
        self.mlp = MLP(d + 2 * item, cfg.mlp_hidden, out_features=require_sample_labels(schema, "cotrain_tiny"),
                       device=device)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns logits ``[B, T]``."""
        e = lookup_jagged(self.ec, batch.sparse_features, self.features)
        user = e[self.cfg.user_feature].values()  # [B, D]
        target = torch.cat([e[f].values() for f in self.cfg.target_features], dim=-1)  # [B, I]
        behaviours = concat_jagged([e[f] for f in self.cfg.history_features])  # values [S, I], lengths [B]
        history, mask = last_n(behaviours.values(), behaviours.lengths(), self.cfg.history_length)  # [B, L, I]
        return self.mlp(torch.cat([user, target, masked_mean(history, mask)], dim=-1))  # [B, T]


class CotrainTiny(nn.Module):
    """Sub-models A and B over the same features, tables with roles ``a`` and ``b``.

    Args:
        cfg: the model config.
        schema: a per-sample CTR schema.
        device: where the parameters are created.
    """

    def __init__(self, cfg: CotrainTinyConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.a = PoolingTower(cfg, schema, "a", device)
        self.b = PoolingTower(cfg, schema, "b", device)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits of A [B, T], logits of B [B, T])``."""
        return self.a(batch), self.b(batch)


class CotrainTrainModule(nn.Module):
    """``bce_a + bce_b + kl_weight * kl``; evaluation rows are model A's predictions (CTR metrics).

    Args:
        model: a :class:`CotrainTiny`.
        kl_weight: weight of the symmetric KL term.
    """

    def __init__(self, model: CotrainTiny, kl_weight: float) -> None:
        super().__init__()
        self.model = model
        self.kl_weight = kl_weight

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        logits_a, logits_b = self.model(batch)  # [B, T], [B, T]
        bce_a = weighted_bce_loss(logits_a, batch.labels, batch.weights)
        bce_b = weighted_bce_loss(logits_b, batch.labels, batch.weights)
        kl = symmetric_kl(logits_a, logits_b, batch.weights)
        loss = bce_a + bce_b + self.kl_weight * kl
        mask = batch.valid.unsqueeze(1).expand_as(logits_a)  # [B, T]
        out = TrainOutput(
            loss=loss.detach(), logits=logits_a.detach(), labels=batch.labels, groups=batch.group_ids, mask=mask,
            loss_parts={"bce_a": bce_a.detach(), "bce_b": bce_b.detach(), "kl": kl.detach()},
        )
        return loss, out


SPEC = register(
    ModelSpec(
        name="cotrain_tiny",
        config_cls=CotrainTinyConfig,
        build=lambda cfg, schema, device: CotrainTiny(cfg, schema, device),
        build_train_module=lambda model, cfg: CotrainTrainModule(model, cfg.kl_weight),
        default_constraints=lambda cfg, schema: {},
        sequence_caps=lambda cfg, schema: history_caps(schema, cfg.history_features, cfg.history_length),
    )
)
