"""The canonical long-sequence CTR table shared by the synthetic generator and the raw-format converters.

One row is one (user, target item) sample with the user's behaviour history before the target, oldest
behaviour first and the most recent behaviour last, stored unpadded (jagged):

=====================  ==================  =====================================================
column                 arrow type          meaning
=====================  ==================  =====================================================
user_id                int64               the user (GAUC group), ids from 1
item_id                int64               the target item, ids from 1
item_category          int64               the target item's category, ids from 1
hist_item_id           list<int64>         behaviour items, oldest first
hist_category          list<int64>         behaviour items' categories
hist_behavior_type     list<int64>         1 pv, 2 cart, 3 fav, 4 buy (a user-item cross feature)
hist_time_delta        list<float32>       seconds between the behaviour and the target request
                                           (non-increasing along the list)
hist_relevance         list<float32>       synthetic data only: each behaviour's true relevance
label                  float32             0 or 1
=====================  ==================  =====================================================

The ``hist_*`` columns form the one sequence group ``history`` (equal lengths in every row; see
:mod:`datasets.schema`). Id 0 is padding everywhere; table sizes are therefore ``count + 1``. The target
and the behaviours share tables: ``t_item_id`` (``item_id``, ``hist_item_id``) and ``t_item_category``
(``item_category``, ``hist_category``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from datasets.schema import FloatFeature, IdFeature, SchemaConfig

#: Behaviour types of the canonical schema (Taobao's names); 0 is padding.
BEHAVIOR_TYPES: dict[str, int] = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}


def canonical_arrow_schema(with_relevance: bool = False) -> pa.Schema:
    """The arrow schema writers of the canonical table produce.

    Args:
        with_relevance: include the synthetic-only ``hist_relevance`` column.
    """
    fields = [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("item_category", pa.int64(), nullable=False),
        pa.field("hist_item_id", pa.list_(pa.int64()), nullable=False),
        pa.field("hist_category", pa.list_(pa.int64()), nullable=False),
        pa.field("hist_behavior_type", pa.list_(pa.int64()), nullable=False),
        pa.field("hist_time_delta", pa.list_(pa.float32()), nullable=False),
    ]
    if with_relevance:
        fields.append(pa.field("hist_relevance", pa.list_(pa.float32()), nullable=False))
    fields.append(pa.field("label", pa.float32(), nullable=False))
    return pa.schema(fields)


def canonical_schema(
    num_users: int,
    num_items: int,
    num_categories: int,
    num_behavior_types: int = len(BEHAVIOR_TYPES),
    with_relevance: bool = False,
) -> SchemaConfig:
    """The :class:`SchemaConfig` of the canonical table.

    Args:
        num_users: number of real user ids (``1..num_users``); the table has ``num_users + 1`` rows.
        num_items: number of real item ids.
        num_categories: number of real category ids.
        num_behavior_types: number of behaviour types (``1..num_behavior_types``).
        with_relevance: also declare ``hist_relevance`` as a float sequence feature (synthetic data only;
            it is the ground truth the labels were drawn from, so a model must not read it by default).

    Returns:
        The schema: six id features (three scalar, three sequences), ``hist_time_delta`` (and optionally
        ``hist_relevance``) as float sequences, label ``label``, group column ``user_id``.
    """
    floats = [FloatFeature("hist_time_delta", sequence=True)]
    if with_relevance:
        floats.append(FloatFeature("hist_relevance", sequence=True))
    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id", num_users + 1),
            IdFeature("item_id", num_items + 1, table="item_id"),
            IdFeature("item_category", num_categories + 1, table="item_category"),
            IdFeature("hist_item_id", num_items + 1, sequence=True, table="item_id"),
            IdFeature("hist_category", num_categories + 1, sequence=True, table="item_category"),
            IdFeature("hist_behavior_type", num_behavior_types + 1, sequence=True),
        ],
        float_features=floats,
        labels=["label"],
        group_column="user_id",
    )
    schema.validate()
    return schema


def canonical_schema_from_meta(meta: dict) -> SchemaConfig:
    """The :class:`SchemaConfig` of a converter's output, from its ``meta.json`` dict (``num_ids``)."""
    n = meta["num_ids"]
    return canonical_schema(n["user_id"], n["item_id"], n["item_category"])


def canonical_table(
    user_id: np.ndarray,
    item_id: np.ndarray,
    item_category: np.ndarray,
    hist_lengths: np.ndarray,
    hist_item_id: np.ndarray,
    hist_category: np.ndarray,
    hist_behavior_type: np.ndarray,
    hist_time_delta: np.ndarray,
    label: np.ndarray,
    hist_relevance: Optional[np.ndarray] = None,
) -> pa.Table:
    """Builds a canonical table from flat numpy arrays (no per-row Python).

    Shapes: R rows, E = ``hist_lengths.sum()`` behaviours in all.

    Args:
        user_id: ``[R]`` int.
        item_id: ``[R]`` int.
        item_category: ``[R]`` int.
        hist_lengths: ``[R]`` int, behaviours per row.
        hist_item_id: ``[E]`` int, rows' histories concatenated (each oldest first).
        hist_category: ``[E]`` int.
        hist_behavior_type: ``[E]`` int.
        hist_time_delta: ``[E]`` float, seconds.
        label: ``[R]`` 0/1.
        hist_relevance: ``[E]`` float or None.

    Returns:
        A table with :func:`canonical_arrow_schema` columns.
    """
    total = int(np.sum(hist_lengths))
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total} behaviours in one table overflow list<> offsets; write smaller row groups")
    offsets = np.zeros(len(hist_lengths) + 1, dtype=np.int32)
    np.cumsum(hist_lengths, out=offsets[1:])
    off = pa.array(offsets, type=pa.int32())

    def lst(values: np.ndarray, t: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(off, pa.array(np.ascontiguousarray(values).astype(t.to_pandas_dtype(), copy=False)))

    columns = [
        pa.array(np.asarray(user_id, dtype=np.int64)),
        pa.array(np.asarray(item_id, dtype=np.int64)),
        pa.array(np.asarray(item_category, dtype=np.int64)),
        lst(hist_item_id, pa.int64()),
        lst(hist_category, pa.int64()),
        lst(hist_behavior_type, pa.int64()),
        lst(hist_time_delta, pa.float32()),
    ]
    if hist_relevance is not None:
        columns.append(lst(hist_relevance, pa.float32()))
    columns.append(pa.array(np.asarray(label, dtype=np.float32)))
    return pa.Table.from_arrays(columns, schema=canonical_arrow_schema(hist_relevance is not None))
