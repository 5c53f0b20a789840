"""Tiny schemas and hand-made Batches for model tests (import as ``tests.models.batch_helpers``).

:func:`tiny_schema`, :func:`make_batch`, :func:`random_rows` / :func:`random_batch` build batches of one fixed
schema; :func:`random_columns` / :func:`columns_to_batch` build them for any schema, through the reader's own
decoding (what a zoo entry's tests use with the schema of its tiny config).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.batch import Batch
from datasets.config import DataConfig
from datasets.decode import Where, decode
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


def random_columns(
    schema: SchemaConfig,
    gen: np.random.Generator,
    num_rows: int,
    lengths: Mapping[str, tuple[int, int]],
) -> dict[str, list[Any]]:
    """Random values of every column of ``schema`` for ``num_rows`` rows (one parquet row per sample/request).

    Ids are uniform in ``[1, num_embeddings)`` (0 is padding), floats in ``[0, 1)``, labels 0/1, weights 1.
    Every sequence group draws its own row lengths, shared by its columns.

    Args:
        lengths: sequence group -> (min, max) row length, both inclusive; every group of the schema.
    """
    groups = schema.sequence_groups()
    missing = sorted(set(groups) - set(lengths))
    assert not missing, f"no lengths for sequence groups {missing}"
    row_lengths = {g: gen.integers(lengths[g][0], lengths[g][1] + 1, num_rows) for g in groups}

    def draw(sequence: bool, group: str, sample: Any) -> list[Any]:
        if not sequence:
            return sample(num_rows).tolist()
        return [sample(int(k)).tolist() for k in row_lengths[group]]

    cols: dict[str, list[Any]] = {}
    for f in schema.id_features:
        low = min(1, f.num_embeddings - 1)
        cols[f.name] = draw(f.sequence, f.group, lambda k, f=f, low=low: gen.integers(low, f.num_embeddings, k))
    for f in schema.float_features:
        cols[f.name] = draw(f.sequence, f.group, gen.random)
    for name in schema.labels:
        cols[name] = gen.integers(0, 2, num_rows).astype(np.float32).tolist()
    for f in schema.sequence_labels:
        cols[f.name] = draw(True, f.group, lambda k: gen.integers(0, 2, k).astype(np.float32))
    if schema.group_column not in cols:
        cols[schema.group_column] = gen.integers(1, 1000, num_rows).tolist()
    if schema.weight_column is not None:
        cols[schema.weight_column] = [1.0] * num_rows
    return cols


def columns_to_batch(schema: SchemaConfig, cols: Mapping[str, list[Any]]) -> Batch:
    """The Batch the reader makes of these columns (:func:`datasets.decode.decode`, no truncation)."""
    types = schema.arrow_types()
    table = pa.table({name: pa.array(values, type=types[name][0]) for name, values in cols.items()})
    return decode(table, schema, DataConfig(schema=schema), {}, Where("random_columns", 0, 0, 0)).to_batch(schema)
