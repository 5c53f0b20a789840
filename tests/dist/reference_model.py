"""A small reference model for the sharding tests: every kind of table the zoo uses, and a dense head.

Shapes: B batch, S total history ids in the batch, D = 8 embedding dim, F = 2 float features.

Features (keys of ``Batch.sparse_features``, in this order): ``user_id`` (scalar, table ``t_user`` in an
EmbeddingBagCollection), ``item_id`` (scalar) and ``hist_item_id`` (sequence), both in table ``t_item`` of an
EmbeddingCollection, and ``item_category`` (scalar, ``t_category``, same EmbeddingCollection). Table sizes are
chosen so that row-wise shards are uneven (21 rows over 2 ranks: 11 + 10).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.batch import Batch
from models.base import TrainOutput

DIM = 8
ROWS = {"t_item": 21, "t_category": 12, "t_user": 15}
FEATURES = ("user_id", "item_id", "item_category", "hist_item_id")
N_FLOAT = 2
GLOBAL_BATCH = 8
MAX_HISTORY = 5


class ReferenceModel(nn.Module):
    """``forward(batch) -> logits [B, 1]`` over [user, item, category, mean(history), float features]."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name="t_item",
                    embedding_dim=DIM,
                    num_embeddings=ROWS["t_item"],
                    feature_names=["item_id", "hist_item_id"],
                ),
                EmbeddingConfig(
                    name="t_category",
                    embedding_dim=DIM,
                    num_embeddings=ROWS["t_category"],
                    feature_names=["item_category"],
                ),
            ],
            device=device,
        )
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t_user", embedding_dim=DIM, num_embeddings=ROWS["t_user"], feature_names=["user_id"],
                    pooling=PoolingType.SUM,
                )
            ],
            device=device,
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * DIM + N_FLOAT, 16, device=device), nn.ReLU(), nn.Linear(16, 1, device=device)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.ec(batch.sparse_features)
        item = e["item_id"].values()  # [B, D]
        category = e["item_category"].values()  # [B, D]
        hist = e["hist_item_id"]
        lengths = hist.lengths()  # [B]
        segment = torch.repeat_interleave(lengths)  # [S], the row of every history id
        summed = torch.zeros_like(item).index_add(0, segment, hist.values())  # [B, D]
        history = summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)  # [B, D]
        user = self.ebc(batch.sparse_features)["user_id"]  # [B, D]
        x = torch.cat([user, item, category, history, batch.float_features], dim=1)  # [B, 4D + F]
        return self.mlp(x)  # [B, 1]


class ReferenceTrainModule(nn.Module):
    """Mean binary cross-entropy over the batch; returns ``(loss, TrainOutput)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        logits = self.model(batch)  # [B, 1]
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        mask = batch.valid.unsqueeze(1).expand_as(logits)
        return loss, TrainOutput(loss.detach(), logits.detach(), batch.labels, batch.group_ids, mask)


def build_reference_train_module(device: torch.device) -> ReferenceTrainModule:
    return ReferenceTrainModule(ReferenceModel(device))


def make_reference_batch(rank: int, world_size: int, seed: int = 0) -> Batch:
    """Rows ``[rank * b, (rank + 1) * b)`` of a fixed global batch of ``GLOBAL_BATCH`` rows (``b`` =
    ``GLOBAL_BATCH / world_size``); ``(0, 1)`` is the whole batch. ``seed`` picks another global batch."""
    if GLOBAL_BATCH % world_size:
        raise ValueError(f"world_size {world_size} must divide the global batch {GLOBAL_BATCH}")
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, ROWS["t_user"], (GLOBAL_BATCH,), generator=g)
    items = torch.randint(0, ROWS["t_item"], (GLOBAL_BATCH,), generator=g)
    categories = torch.randint(0, ROWS["t_category"], (GLOBAL_BATCH,), generator=g)
    hist_lengths = torch.randint(0, MAX_HISTORY + 1, (GLOBAL_BATCH,), generator=g)
    hist_lengths[0] = 0  # an empty history
    hist = [torch.randint(0, ROWS["t_item"], (int(n),), generator=g) for n in hist_lengths]
    floats = torch.randn(GLOBAL_BATCH, N_FLOAT, generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH, 1), generator=g).float()

    b = GLOBAL_BATCH // world_size
    rows = range(rank * b, (rank + 1) * b)
    ones = torch.ones(b, dtype=torch.int64)
    lengths = torch.cat([ones, ones, ones, hist_lengths[rows.start : rows.stop]])  # [4 * b], key-major
    values = torch.cat(
        [users[rows.start : rows.stop], items[rows.start : rows.stop], categories[rows.start : rows.stop]]
        + [hist[i] for i in rows]
    )
    return Batch(
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=list(FEATURES), values=values, lengths=lengths),
        float_sequences=KeyedJaggedTensor.from_lengths_sync(
            keys=[], values=torch.empty(0), lengths=torch.empty(0, dtype=torch.int64)
        ),
        float_features=floats[rows.start : rows.stop],
        labels=labels[rows.start : rows.stop],
        sequence_labels=KeyedJaggedTensor(
            keys=[], values=torch.empty(0), lengths=torch.empty(0, dtype=torch.int64), stride=b
        ),
        group_ids=users[rows.start : rows.stop],
        weights=torch.ones(b),
        valid=torch.ones(b, dtype=torch.bool),
        id_fixes=torch.zeros(len(FEATURES), dtype=torch.int64),
    )
