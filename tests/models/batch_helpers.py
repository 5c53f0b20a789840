"""Tiny schemas and hand-made Batches for model tests (import as ``tests.models.batch_helpers``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.batch import Batch
from datasets.schema import IdFeature, SchemaConfig

NUM_USERS = 40
NUM_ITEMS = 60
NUM_CATEGORIES = 8


def tiny_schema(labels: Sequence[str] = ("click",)) -> SchemaConfig:
    """user_id, item_id / hist_item_id (table t_item_id), item_category / hist_category (t_item_category)."""
    return SchemaConfig(
        id_features=[
            IdFeature("user_id", NUM_USERS),
            IdFeature("item_id", NUM_ITEMS, table="item_id"),
            IdFeature("item_category", NUM_CATEGORIES, table="item_category"),
            IdFeature("hist_item_id", NUM_ITEMS, sequence=True, table="item_id"),
            IdFeature("hist_category", NUM_CATEGORIES, sequence=True, table="item_category"),
        ],
        labels=list(labels),
    )


def make_batch(
    schema: SchemaConfig,
    scalars: dict[str, Sequence[int]],
    sequences: dict[str, Sequence[Sequence[int]]],
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> Batch:
    """A Batch from per-feature Python lists (sparse keys in schema order).

    Args:
        schema: gives the key order.
        scalars: feature -> ``[B]`` ids.
        sequences: feature -> B jagged rows of ids (oldest first).
        labels: ``[B, T]``.
        weights: ``[B]`` (default ones; 0 marks padding rows).
    """
    b = labels.size(0)
    keys: list[str] = []
    values: list[int] = []
    lengths: list[int] = []
    for f in schema.id_features:
        if f.name in scalars:
            rows: Sequence[Sequence[int]] = [[v] for v in scalars[f.name]]
        elif f.name in sequences:
            rows = sequences[f.name]
        else:
            continue
        assert len(rows) == b, f"{f.name}: {len(rows)} rows for batch size {b}"
        keys.append(f.name)
        for row in rows:
            values.extend(int(v) for v in row)
            lengths.append(len(row))
    if weights is None:
        weights = torch.ones(b)
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=keys, values=torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lengths, dtype=torch.long)
        ),
        float_sequences=KeyedJaggedTensor(
            keys=[], values=torch.empty(0), lengths=torch.empty(0, dtype=torch.long), stride=b
        ),
        float_features=torch.empty(b, 0),
        labels=labels.float(),
        sequence_labels=KeyedJaggedTensor(
            keys=[], values=torch.empty(0), lengths=torch.empty(0, dtype=torch.long), stride=b
        ),
        group_ids=torch.tensor(scalars.get(schema.group_column, [0] * b), dtype=torch.long),
        weights=weights.float(),
        valid=weights > 0,
        id_fixes=torch.zeros(len(schema.id_features), dtype=torch.long),
    )


def random_rows(
    gen: torch.Generator, batch_size: int, max_len: int, min_len: int = 0
) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
    """Random scalar and (aligned) sequence ids for :func:`tiny_schema`; ids start at 1 (0 is padding)."""
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen).tolist()
    scalars = {
        "user_id": torch.randint(1, NUM_USERS, (batch_size,), generator=gen).tolist(),
        "item_id": torch.randint(1, NUM_ITEMS, (batch_size,), generator=gen).tolist(),
        "item_category": torch.randint(1, NUM_CATEGORIES, (batch_size,), generator=gen).tolist(),
    }
    sequences = {
        "hist_item_id": [torch.randint(1, NUM_ITEMS, (n,), generator=gen).tolist() for n in lengths],
        "hist_category": [torch.randint(1, NUM_CATEGORIES, (n,), generator=gen).tolist() for n in lengths],
    }
    return scalars, sequences


def random_batch(
    schema: SchemaConfig, gen: torch.Generator, batch_size: int, max_len: int, min_len: int = 0
) -> Batch:
    """A random Batch for :func:`tiny_schema` with random 0/1 labels."""
    scalars, sequences = random_rows(gen, batch_size, max_len, min_len)
    labels = torch.randint(0, 2, (batch_size, len(schema.labels)), generator=gen)
    return make_batch(schema, scalars, sequences, labels)
