"""Test entry ``request_tiny``: a tiny request-level ranking model (tests only, not a zoo entry).

One row of the data is a request: the user, the user's history and the request's candidates (a second
sequence group) with per-candidate clicks (``sequence_labels``). The model scores every candidate of the batch
in one pass; the train module returns one evaluation row per candidate, grouped by request, for the
``ranking`` metric set. Registered on import (``imports: [tests.entries.request_tiny]`` in a config).

Shapes: B requests, L history length kept, S behaviours in the batch, N candidates in the batch (sum of the
candidate counts), D embedding dim, T tasks (1: the one sequence label).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from models.base import TrainOutput, weighted_bce_loss
from models.registry import ModelSpec, register
from modules.embedding import build_embedding_collection, lookup_jagged
from modules.mlp import MLP
from modules.sequence import last_n, masked_mean


@dataclass
class RequestTinyConfig:
    """The ``model:`` section of a ``request_tiny`` run.

    Attributes:
        name: registry key (``request_tiny``).
        embedding_dim: D.
        history_length: L, the most recent behaviours mean-pooled (the reader drops older ones).
        user_feature: scalar user id feature.
        history_feature: the behaviour items (a sequence feature).
        candidate_feature: the candidate items (a sequence feature of another group than the history).
        label: the per-candidate click label (a ``sequence_labels`` column of the candidates' group).
        mlp_hidden: hidden widths of the candidate scoring MLP.
    """

    name: str = "request_tiny"
    embedding_dim: int = 8
    history_length: int = 20
    user_feature: str = "user_id"
    history_feature: str = "hist_item_id"
    candidate_feature: str = "cand_item_id"
    label: str = "cand_click"
    mlp_hidden: list[int] = field(default_factory=lambda: [16])


def _check_schema(cfg: RequestTinyConfig, schema: SchemaConfig) -> None:
    """Raises ValueError (KeyError for unknown features) when the schema is not request-level as configured."""
    if schema.id_feature(cfg.user_feature).sequence:
        raise ValueError(f"{cfg.user_feature} must be a scalar id feature")
    hist, cand = schema.id_feature(cfg.history_feature), schema.id_feature(cfg.candidate_feature)
    if not hist.sequence or not cand.sequence or hist.group == cand.group:
        raise ValueError(
            f"{cfg.history_feature} and {cfg.candidate_feature} must be sequence features of two sequence groups"
        )
    labels = {f.name: f.group for f in schema.sequence_labels}
    # One task, the candidates' click: the trainer names the tasks after the sequence labels when labels is [].
    if schema.labels or list(labels) != [cfg.label] or labels[cfg.label] != cand.group:
        raise ValueError(
            f"request_tiny needs labels: [] and the one sequence label {cfg.label!r} in group {cand.group!r};"
            f" the schema has labels {list(schema.labels)}, sequence labels {labels}"
        )


class RequestTiny(nn.Module):
    """Scores every candidate of every request: ``MLP([c, r, c * r])`` with ``c`` the candidate embedding and
    ``r = Linear([e_user, mean_j e_j])`` the request vector (mean over the last L behaviours).

    Candidates and behaviours share the item table when the schema says so (``table: item_id``).

    Args:
        cfg: the model config.
        schema: a request-level schema (see :func:`_check_schema`).
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: RequestTinyConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check_schema(cfg, schema)
        d = cfg.embedding_dim
        self.cfg = cfg
        self.features = [cfg.user_feature, cfg.history_feature, cfg.candidate_feature]
        self.ec = build_embedding_collection(schema, self.features, d, device)
        self.request = nn.Linear(2 * d, d, device=device)
        self.mlp = MLP(3 * d, cfg.mlp_hidden, out_features=1, device=device)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits [N, 1], candidates per request [B])``, candidates in batch order."""
        e = lookup_jagged(self.ec, batch.sparse_features, self.features)
        user = e[self.cfg.user_feature].values()  # [B, D]
        hist = e[self.cfg.history_feature]  # values [S, D], lengths [B]
        history, mask = last_n(hist.values(), hist.lengths(), self.cfg.history_length)  # [B, L, D], [B, L]
        r = self.request(torch.cat([user, masked_mean(history, mask)], dim=-1))  # [B, D]
        cand = e[self.cfg.candidate_feature]
        lengths = cand.lengths()  # [B]
        c = cand.values()  # [N, D]
        r = torch.repeat_interleave(r, lengths, dim=0)  # [N, D]
        return self.mlp(torch.cat([c, r, c * r], dim=-1)), lengths  # [N, 1], [B]


class RequestTrainModule(nn.Module):
    """BCE over every candidate of the batch; evaluation rows are the candidates, grouped by request.

    The request id is ``Batch.group_ids`` (configs set ``data.schema.group_column: request_id``, unique over
    the data set, so that candidates of different requests gathered from several ranks never share a group).

    Args:
        model: a :class:`RequestTiny`.
    """

    def __init__(self, model: RequestTiny) -> None:
        super().__init__()
        self.model = model
        self.label = model.cfg.label

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        logits, lengths = self.model(batch)  # [N, 1], [B]
        labels = batch.sequence_labels[self.label].values().unsqueeze(1)  # [N, 1]
        weights = torch.repeat_interleave(batch.weights, lengths)  # [N] 0 on padding requests
        groups = torch.repeat_interleave(batch.group_ids, lengths)  # [N]
        valid = torch.repeat_interleave(batch.valid, lengths).unsqueeze(1)  # [N, 1]
        loss = weighted_bce_loss(logits, labels, weights)
        out = TrainOutput(
            loss=loss.detach(), logits=logits.detach(), labels=labels, groups=groups, mask=valid,
            loss_parts={"bce": loss.detach()},
        )
        return loss, out


def _caps(cfg: RequestTinyConfig, schema: SchemaConfig) -> dict[str, int]:
    return {schema.id_feature(cfg.history_feature).group: cfg.history_length}


SPEC = register(
    ModelSpec(
        name="request_tiny",
        config_cls=RequestTinyConfig,
        build=lambda cfg, schema, device: RequestTiny(cfg, schema, device),
        build_train_module=lambda model, cfg: RequestTrainModule(model),
        default_constraints=lambda cfg, schema: {},
        sequence_caps=_caps,
        metrics="ranking",
        select_metric="ndcg@5",
    )
)
