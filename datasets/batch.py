"""The Batch every reader yields and every train module consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """A batch of samples (or requests), in torchrec's pipelineable form.

    Shapes: B batch, F scalar float features, T tasks (scalar label columns), N id features.

    Attributes:
        sparse_features: every id feature, keys in schema order. Scalar features have length 1 per row;
            sequence features are jagged (most recent behaviour last); sequence features of one group have
            equal lengths per row. Ids are already validated against their tables.
        float_sequences: float list features, aligned with the other columns of their group (values
            float32), keys in schema order; empty keys when the schema has none.
        float_features: ``[B, F]`` scalar float features (F may be 0).
        labels: ``[B, T]`` float32, 0 or 1 (T may be 0 when the schema has only sequence labels).
        sequence_labels: per-element 0/1 labels (values float32, e.g. one per candidate), aligned with the
            other columns of their group, keys in schema order; empty keys (stride B) when the schema has none.
        group_ids: ``[B]`` int64, the GAUC group (user id).
        weights: ``[B]`` float32 per-sample loss weight; 0 on padding rows.
        valid: ``[B]`` bool, False on padding rows (added to keep every rank's batch the same size).
        id_fixes: ``[N]`` int64, ids the reader rewrote under the ``hash``/``clip`` policy in this batch.
    """

    sparse_features: KeyedJaggedTensor
    float_sequences: KeyedJaggedTensor
    float_features: torch.Tensor
    labels: torch.Tensor
    sequence_labels: KeyedJaggedTensor
    group_ids: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    id_fixes: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.labels.size(0)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            float_sequences=self.float_sequences.to(device=device, non_blocking=non_blocking),
            float_features=self.float_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            sequence_labels=self.sequence_labels.to(device=device, non_blocking=non_blocking),
            group_ids=self.group_ids.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
            valid=self.valid.to(device=device, non_blocking=non_blocking),
            id_fixes=self.id_fixes.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.float_sequences.record_stream(stream)
        self.sequence_labels.record_stream(stream)
        for t in (self.float_features, self.labels, self.group_ids, self.weights, self.valid, self.id_fixes):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            float_sequences=self.float_sequences.pin_memory(),
            float_features=self.float_features.pin_memory(),
            labels=self.labels.pin_memory(),
            sequence_labels=self.sequence_labels.pin_memory(),
            group_ids=self.group_ids.pin_memory(),
            weights=self.weights.pin_memory(),
            valid=self.valid.pin_memory(),
            id_fixes=self.id_fixes.pin_memory(),
        )
