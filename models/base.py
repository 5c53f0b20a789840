"""Train modules: a zoo model plus its loss, returning ``(loss, TrainOutput)`` (TrainPipelineSparseDist's contract).

Shapes: B batch, N evaluation rows (B for per-sample models, candidates for request-level ones), T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from datasets.batch import Batch


@dataclass
class TrainOutput:
    """What a train module reports besides the loss it back-propagates. Every tensor is detached.

    Attributes:
        loss: the total loss (scalar).
        loss_parts: named parts of it for logging (``ctr``, ``kl``, ...); TensorBoard gets ``train/<name>``.
        logits: ``[N, T]`` the rows evaluation scores.
        labels: ``[N, T]`` 0/1.
        groups: ``[N]`` int64, the group of each row (the user for GAUC, the request for ranking metrics).
        mask: ``[N, T]`` bool, True where the row counts for the task (False on padding rows and candidates).
        row_stats: named per-row statistics ``[R]`` (any R, e.g. one per sample), NaN where undefined or on
            padding rows; evaluation reports each one's mean over the defined rows of every rank as
            ``<name>`` and their count as ``<name>/rows`` (e.g. a search unit's NDCG against known relevance).
        users: ``[N]`` int64, the user of each row, when ``groups`` are something else (requests): metric
            sets that also group by user (``preranking``'s per-user AUC) read it; None = not given.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    mask: torch.Tensor
    loss_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    row_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    users: Optional[torch.Tensor] = None


def weighted_bce_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the weighted samples, summed over tasks.

    ``sum_t sum_b w_b * bce(logits_bt, labels_bt) / max(sum_b w_b, 1)``; rows with ``w_b = 0`` (padding)
    contribute neither loss nor gradient.

    Args:
        logits: ``[B, T]``.
        labels: ``[B, T]`` 0 or 1.
        weights: ``[B]`` per-sample weights.

    Returns:
        scalar loss.
    """
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")  # [B, T]
    w = weights.to(logits.dtype)  # [B]
    per_task = (bce * w.unsqueeze(1)).sum(dim=0)  # [T]
    return per_task.sum() / w.sum().clamp(min=1.0)


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) + KL(q || p)`` of Bernoulli predictions, weighted mean over rows, summed over the rest.

    For Bernoulli ``p = sigmoid(a)``, ``q = sigmoid(b)`` the sum is ``(p - q) * (a - b)`` (>= 0, zero iff
    ``a = b``). Gradients reach both sides (mutual learning, DUET's consistency term).

    Args:
        logits_p: ``[N]`` or ``[N, T]``.
        logits_q: the same shape.
        weights: ``[N]`` per-row weights (0 on padding).
    """
    kl = (torch.sigmoid(logits_p) - torch.sigmoid(logits_q)) * (logits_p - logits_q)  # [N, ...]
    w = weights.to(kl.dtype).reshape((-1,) + (1,) * (kl.dim() - 1))  # [N, 1...]
    return (kl * w).sum() / weights.to(kl.dtype).sum().clamp(min=1.0)


class CTRTrainModule(nn.Module):
    """Adds the CTR loss to a per-sample model (``forward(batch) -> logits [B, T]``).

    Args:
        model: the zoo model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        """Returns ``(loss, TrainOutput)``; evaluation rows are the samples, grouped by ``batch.group_ids``."""
        logits = self.model(batch)  # [B, T]
        loss = weighted_bce_loss(logits, batch.labels, batch.weights)
        mask = batch.valid.unsqueeze(1).expand_as(logits)  # [B, T]
        out = TrainOutput(
            loss=loss.detach(), logits=logits.detach(), labels=batch.labels, groups=batch.group_ids, mask=mask,
            loss_parts={"ctr": loss.detach()},
        )
        return loss, out


def build_ctr_train_module(model: nn.Module, cfg: Any) -> CTRTrainModule:
    """The ``build_train_module`` of CTR zoo entries; ``cfg`` (the model config) is not used."""
    return CTRTrainModule(model)
