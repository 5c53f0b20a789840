"""The train module: wraps a zoo model (``forward(batch) -> logits [B, T]``) with its loss.

Shapes: B batch, T tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from datasets.batch import Batch


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


class CTRTrainModule(nn.Module):
    """Adds the CTR loss to a model, following TrainPipelineSparseDist's ``(loss, output)`` contract.

    Args:
        model: a zoo model whose ``forward(batch)`` returns logits ``[B, T]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Returns ``(loss, (loss.detach(), logits.detach() [B, T], labels [B, T]))``."""
        logits = self.model(batch)  # [B, T]
        loss = weighted_bce_loss(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def build_ctr_train_module(model: nn.Module, cfg: Any) -> CTRTrainModule:
    """The ``build_train_module`` of CTR zoo entries; ``cfg`` (the model config) is not used."""
    return CTRTrainModule(model)
