"""Small handwritten schema, tables and configs shared by the data-layer tests."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from datasets.config import DataConfig
from datasets.schema import FloatFeature, IdFeature, IdPolicy, SchemaConfig


def small_schema(float_sequences: bool = True, weight: bool = False) -> SchemaConfig:
    """user_id in [0, 10); item_id and hist_item_id share t_item, [0, 20); scalar float price; label."""
    floats = [FloatFeature("price")]
    if float_sequences:
        floats.append(FloatFeature("hist_time_delta", sequence=True))
    return SchemaConfig(
        id_features=[
            IdFeature("user_id", 10),
            IdFeature("item_id", 20, table="item"),
            IdFeature("hist_item_id", 20, sequence=True, table="item"),
        ],
        float_features=floats,
        labels=["label"],
        group_column="user_id",
        weight_column="w" if weight else None,
    )


def small_table(n: int, start: int = 0) -> pa.Table:
    """``n`` rows; row ``r = start + i`` has price ``r`` (a unique row tag), user_id ``r % 10``, item_id
    ``3r % 20``, label ``r % 2``, hist_item_id ``[(r + k) % 20 for k < r % 4]`` and hist_time_delta
    ``[100 (len - k) for k < len]`` (decreasing: oldest first)."""
    rows = range(start, start + n)
    hist = [[(r + k) % 20 for k in range(r % 4)] for r in rows]
    return pa.table(
        {
            "user_id": pa.array([r % 10 for r in rows], pa.int64()),
            "item_id": pa.array([(3 * r) % 20 for r in rows], pa.int64()),
            "hist_item_id": pa.array(hist, pa.list_(pa.int64())),
            "hist_time_delta": pa.array(
                [[float(100 * (len(h) - k)) for k in range(len(h))] for h in hist], pa.list_(pa.float32())
            ),
            "price": pa.array([float(r) for r in rows], pa.float32()),
            "label": pa.array([float(r % 2) for r in rows], pa.float32()),
        }
    )


def make_cfg(
    paths: list[str],
    schema: Optional[SchemaConfig] = None,
    batch_size: int = 4,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    id_policy: IdPolicy = IdPolicy.error,
    max_sequence_length: int = 0,
) -> DataConfig:
    """A DataConfig reading ``paths`` for both training and evaluation."""
    return DataConfig(
        schema=schema or small_schema(),
        train_paths=paths,
        eval_paths=paths,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=shuffle,
        seed=seed,
        id_policy=id_policy,
        max_sequence_length=max_sequence_length,
    )
