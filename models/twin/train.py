"""The train module of the two-stage entries: CTR loss, SIM-soft's auxiliary loss, the GSU's search quality.

Shapes: B batch, T tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datasets.batch import Batch
from models.base import TrainOutput, weighted_bce_loss
from models.twin.model import TwoStage
from modules.search import search_quality


class TwoStageTrainModule(nn.Module):
    """``loss = ctr + gsu_aux_weight * gsu_aux`` (the second term only for ``search: inner_product``).

    In eval mode, with ``relevance_feature`` set, each row also reports ``gsu_ndcg@K`` / ``gsu_recall@K``
    against the data's true relevance (``TrainOutput.row_stats``; evaluation averages them).

    Args:
        model: the :class:`TwoStage` model.
    """

    def __init__(self, model: TwoStage) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        cfg = self.model.cfg
        out = self.model.run(batch)
        ctr = weighted_bce_loss(out.logits, batch.labels, batch.weights)
        loss, parts = ctr, {"ctr": ctr.detach()}
        if out.aux_logits is not None:
            aux = weighted_bce_loss(out.aux_logits.unsqueeze(1), batch.labels[:, :1], batch.weights)
            loss = loss + cfg.gsu_aux_weight * aux
            parts["gsu_aux"] = aux.detach()
        stats: dict[str, torch.Tensor] = {}
        if cfg.relevance_feature is not None and not self.training:
            relevance = batch.float_sequences[cfg.relevance_feature].values()  # [S]
            for name, v in search_quality(relevance, out.lengths, out.search, cfg.top_k).items():
                stats[name] = torch.where(batch.valid, v, torch.full_like(v, float("nan")))  # [B]
        mask = batch.valid.unsqueeze(1).expand_as(out.logits)  # [B, T]
        result = TrainOutput(
            loss=loss.detach(), logits=out.logits.detach(), labels=batch.labels, groups=batch.group_ids,
            mask=mask, loss_parts=parts, row_stats=stats,
        )
        return loss, result


def build_two_stage_train_module(model: nn.Module, cfg: Any) -> TwoStageTrainModule:
    """The ``build_train_module`` of ``twin``, ``sim_hard`` and ``sim_soft``."""
    return TwoStageTrainModule(model)
