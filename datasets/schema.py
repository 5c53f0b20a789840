"""The canonical long-sequence CTR sample schema, stored as parquet.

One parquet row is one sample: a (user, target item) pair with the user's behaviour history. A data set may
instead store one row per *request*: the user's history plus the request's candidates as list columns (one
element per candidate), labelled per candidate. Columns are declared, by role, in a :class:`SchemaConfig`:

* ``id_features``: integer ids looked up in embedding tables. A scalar feature is an ``int64`` column
  (``user_id``, ``item_id``, ``item_category``); a sequence feature is a ``list<int64>`` column
  (``hist_item_id``, ``hist_category``, ``hist_behavior_type``; ``cand_item_id`` in request-level data).
  Behaviour sequences are chronological: oldest first, the most recent behaviour last. Sequences are
  stored unpadded (jagged); padding is the model's business. ``num_embeddings`` is the table size: a valid
  id lies in ``[0, num_embeddings)``; id 0 is padding by convention (converters remap real ids from 1).
* ``float_features``: ``float32``/``float64`` columns, scalar or ``list<float>`` (``hist_time_delta``:
  seconds between the behaviour and the target request; ``hist_play_time``; the synthetic data's
  ``hist_relevance``).
* ``labels``: one scalar column per task, values exactly 0 or 1 (may be empty when ``sequence_labels``
  is not).
* ``sequence_labels``: list columns of per-element 0/1 labels (request-level data: ``cand_click``, one label
  per candidate), float, int or bool elements.
* ``group_column``: the id that GAUC groups by (the user), ``weight_column``: an optional per-sample weight
  (IPS), both scalar columns.

Sequence groups
    Every sequence column (id, float or label) belongs to a *group* (``group``, default ``"history"``):
    all sequence columns of one group have the same length in every row, element ``k`` of each describing
    the same behaviour (or candidate). The reader rejects a row whose columns of one group differ in
    length, and truncation keeps the same tail of every column of a group. Request-level data uses a second
    group, e.g. ``"candidates"`` for ``cand_item_id`` and ``cand_click``, independent of ``"history"``.
    ``group`` means nothing on scalar columns.

Tables are named ``t_<feature>``; features that share a table (a target item and the behaviour items) name
it with ``table``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa


class IdPolicy(enum.Enum):
    """What the reader does with an id outside ``[0, num_embeddings)``."""

    error = "error"  # raise DataError naming file, row group, row and column (default)
    hash = "hash"  # id -> id mod num_embeddings (Python semantics: always non-negative); counted
    clip = "clip"  # id -> clamp(id, 0, num_embeddings - 1); counted


class IdMapping(enum.Enum):
    """How the reader maps a feature's stored ids to table rows (``IdFeature.mapping``)."""

    identity = "identity"  # ids are rows already (converters remap to [1, n)); out-of-range ids per id_policy
    hash = "hash"  # raw 64-bit ids: row = splitmix64(id) mod num_embeddings, every id (production ids)
    mch = "mch"  # raw 64-bit ids passed through; torchrec's managed-collision module (ZCH) maps them to rows


class MchEvictionPolicy(enum.Enum):
    """torchrec's eviction policies for ``mapping: mch`` (``MchConfig.eviction_policy``)."""

    lfu = "lfu"  # LFU_EvictionPolicy: keep the ids seen most often (counts accumulate over all of training)
    distance_lfu = "distance_lfu"  # DistanceLFU_EvictionPolicy: counts / (steps since last seen + 1) ** decay


MCH_MAX_INPUT_HASH_SIZE = 2**63 - 1  # torchrec's default; int64 max itself is the ZCH's empty-slot sentinel


@dataclass
class MchConfig:
    """Options of a ``mapping: mch`` feature: a zero-collision hash table (ZCH) of ``num_embeddings`` rows.

    torchrec's ``MCHManagedCollisionModule`` keeps the ``num_embeddings - 1`` most valuable ids seen so far
    (by ``eviction_policy``), each on its own row; every other id shares the last row (the miss row).
    Training steps record the ids; every ``eviction_interval`` steps the recorded ids compete with the
    kept ones for rows. Evaluation never changes the kept ids.

    Attributes:
        eviction_policy: ``distance_lfu`` (default: frequency discounted by staleness, torchrec's usual
            choice for drifting id populations) or ``lfu`` (frequency only).
        eviction_interval: training steps between updates of the kept ids (default 1: new ids get rows at
            the step they first appear; each update sorts ``num_embeddings`` ids, so raise it for big tables).
        decay_exponent: ``distance_lfu`` only: staleness exponent (default 1.0; 0 is plain LFU).
        input_hash_size: raw ids are hashed (``hash_input``) or must fall into ``[0, input_hash_size)``;
            row-wise shards own equal blocks of this range (default ``2**63 - 1``, torchrec's default).
        hash_input: splitmix64 the raw ids into ``[0, input_hash_size)`` inside the model before the ZCH
            (default true: ids of any int64 value, negatives included, spread evenly over the row-wise
            shards however they are distributed). False: the reader checks ``0 <= id < input_hash_size``
            (others follow ``data.id_policy``) and the ZCH keeps the raw ids themselves.
    """

    eviction_policy: MchEvictionPolicy = MchEvictionPolicy.distance_lfu
    eviction_interval: int = 1
    decay_exponent: float = 1.0
    input_hash_size: int = MCH_MAX_INPUT_HASH_SIZE
    hash_input: bool = True

    def validate(self, feature: str, num_embeddings: int) -> None:
        """Raises ValueError naming ``feature`` and the field when an option is out of range."""
        where = f"id feature {feature}: mch"
        if self.eviction_interval < 1:
            raise ValueError(f"{where}.eviction_interval must be >= 1 (training steps), got {self.eviction_interval}")
        if not self.decay_exponent >= 0:
            raise ValueError(f"{where}.decay_exponent must be >= 0, got {self.decay_exponent}")
        if not num_embeddings <= self.input_hash_size <= MCH_MAX_INPUT_HASH_SIZE:
            raise ValueError(
                f"{where}.input_hash_size must be in [num_embeddings, 2**63 - 1] = [{num_embeddings},"
                f" {MCH_MAX_INPUT_HASH_SIZE}], got {self.input_hash_size}"
            )
        if num_embeddings < 2:
            raise ValueError(f"id feature {feature}: mapping mch needs num_embeddings >= 2 (one row is the miss row)")


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def hash_ids(ids, num_embeddings: int):
    """Rows of raw 64-bit ids in a table of ``num_embeddings`` rows: ``splitmix64(id) mod num_embeddings``.

    splitmix64 (Steele et al. 2014's finaliser) mixes every bit of the id into every bit of the hash, so ids
    with structure (sequential, multiples of the table size, high bits only) spread uniformly over the rows,
    which a plain ``id mod n`` does not do. Deterministic, vectorised (numpy uint64 arithmetic wraps), any
    int64 including negatives.

    Args:
        ids: int64 numpy array.
        num_embeddings: rows of the table (> 0).

    Returns:
        int64 numpy array of rows in ``[0, num_embeddings)``.
    """
    import numpy as np

    return (splitmix64(ids) % np.uint64(num_embeddings)).astype(np.int64)


def splitmix64(ids):
    """splitmix64's finaliser of int64 ids (numpy): the uint64 hash that :func:`hash_ids` reduces mod n.

    Args:
        ids: int64 numpy array.

    Returns:
        uint64 numpy array, the same shape.
    """
    import numpy as np

    x = ids.astype(np.int64).view(np.uint64) + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def table_name(table: str, role: Optional[str] = None) -> str:
    """The one name of an embedding table: ``t_<table>``, or ``t_<table>__<role>`` for a table with a role.

    A role tells apart several tables of one feature in one model (DARE's ``attn`` / ``repr`` pair). Every
    table name (model builders, sharding constraints and YAML keys, plans) comes from here;
    :func:`parse_table_name` inverts it.

    Args:
        table: the schema's table (``IdFeature.table``, default the feature name), without the ``t_`` prefix.
        role: None, or a non-empty name.

    Raises:
        ValueError: ``table`` is empty, contains ``__`` or ends with ``_``, or ``role`` is empty, contains
            ``__`` or starts with ``_`` (the name would not parse back).
    """
    if not table or "__" in table or table.endswith("_"):
        raise ValueError(f"table {table!r}: must be non-empty, without '__', not ending with '_'")
    if role is None:
        return "t_" + table
    if not role or "__" in role or role.startswith("_"):
        raise ValueError(f"role {role!r} of table {table!r}: must be non-empty, without '__', not starting with '_'")
    return f"t_{table}__{role}"


def parse_table_name(name: str) -> tuple[str, Optional[str]]:
    """Inverts :func:`table_name`: ``"t_item_id__attn"`` -> ``("item_id", "attn")``, ``"t_user_id"`` ->
    ``("user_id", None)``.

    Raises:
        ValueError: ``name`` is not a name that :func:`table_name` gives.
    """
    table, sep, role = name[2:].partition("__")
    parsed = (table, role if sep else None)
    try:
        ok = name.startswith("t_") and table_name(*parsed) == name
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name!r} is not a table name: expected t_<table> or t_<table>__<role>")
    return parsed


@dataclass
class IdFeature:
    """An integer id column looked up in an embedding table.

    Attributes:
        name: column name, also the KeyedJaggedTensor key.
        num_embeddings: rows of the table: valid ids are ``0 <= id < num_embeddings``.
        sequence: True for a ``list<int64>`` column (one id per element), False for an ``int64`` column.
        table: embedding table shared by several features, without the ``t_`` prefix (default: ``name``).
        group: sequence group (sequence features only): columns of one group have equal lengths per row.
        mapping: ``identity`` (stored ids are rows: ids outside ``[0, num_embeddings)`` follow
            ``data.id_policy``), ``hash`` (stored ids are raw 64-bit ids, e.g. video or user ids of a
            production log: every id is mapped to ``splitmix64(id) mod num_embeddings`` by the reader, see
            :func:`hash_ids`) or ``mch`` (raw ids reach the model, where torchrec's managed-collision module
            gives the most valuable ids rows of their own, see :class:`MchConfig`). Features sharing a table
            must agree.
        mch: options of ``mapping: mch`` (ignored otherwise); features sharing a table must agree.
    """

    name: str = "???"
    num_embeddings: int = 0
    sequence: bool = False
    table: Optional[str] = None
    group: str = "history"
    mapping: IdMapping = IdMapping.identity
    mch: MchConfig = field(default_factory=MchConfig)

    @property
    def table_name(self) -> str:
        """The table's name, ``t_<table or name>`` (see :func:`table_name`)."""
        return table_name(self.table or self.name)


@dataclass
class FloatFeature:
    """A float column: scalar (``float``) or a list aligned with the other columns of its group.

    Attributes:
        name: column name, also the KeyedJaggedTensor key of a sequence.
        sequence: True for a ``list<float>`` column, False for a ``float`` column.
        group: sequence group (sequences only): columns of one group have equal lengths per row.
    """

    name: str = "???"
    sequence: bool = False
    group: str = "history"


@dataclass
class SchemaConfig:
    """Column roles of a data set; see the module docstring.

    Attributes:
        id_features: id columns, scalar or sequence, in KeyedJaggedTensor key order.
        float_features: float columns, scalar or sequence.
        labels: scalar 0/1 label columns, one per task (may be empty if ``sequence_labels`` is not).
        sequence_labels: list columns of per-element 0/1 labels; ``sequence`` must be True and ``group``
            names the group they are aligned with (e.g. ``cand_click`` in group ``candidates``).
        group_column: scalar id column GAUC groups by.
        weight_column: optional scalar per-sample weight column.
    """

    id_features: list[IdFeature] = field(default_factory=list)
    float_features: list[FloatFeature] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: ["label"])
    sequence_labels: list[FloatFeature] = field(default_factory=list)
    group_column: str = "user_id"
    weight_column: Optional[str] = None

    def id_feature(self, name: str) -> IdFeature:
        for f in self.id_features:
            if f.name == name:
                return f
        raise KeyError(f"no id feature {name!r}; id features are {[f.name for f in self.id_features]}")

    @property
    def float_sequences(self) -> list[FloatFeature]:
        return [f for f in self.float_features if f.sequence]

    @property
    def float_scalars(self) -> list[FloatFeature]:
        return [f for f in self.float_features if not f.sequence]

    def sequence_groups(self) -> dict[str, list[str]]:
        """Group -> its sequence columns: id sequences, float sequences, then sequence labels, each in schema
        order; groups in order of first appearance."""
        out: dict[str, list[str]] = {}
        columns = (
            [f for f in self.id_features if f.sequence] + self.float_sequences + list(self.sequence_labels)
        )
        for f in columns:
            out.setdefault(f.group, []).append(f.name)
        return out

    def table_sizes(self) -> dict[str, int]:
        """Table name -> rows, checking that features sharing a table agree on its size."""
        sizes: dict[str, int] = {}
        for f in self.id_features:
            n = sizes.setdefault(f.table_name, f.num_embeddings)
            if n != f.num_embeddings:
                raise ValueError(
                    f"features sharing table {f.table_name} disagree on num_embeddings: {n} vs {f.num_embeddings}"
                    f" ({f.name})"
                )
        return sizes

    def arrow_types(self) -> dict[str, tuple[pa.DataType, ...]]:
        """Column -> accepted arrow types (the first is what writers in this project produce)."""
        ints = (pa.int64(), pa.int32())
        floats = (pa.float32(), pa.float64())
        label_types = floats + ints + (pa.int8(), pa.bool_())

        def lists(types: tuple[pa.DataType, ...]) -> tuple[pa.DataType, ...]:
            return tuple(pa.list_(t) for t in types) + tuple(pa.large_list(t) for t in types)

        out: dict[str, tuple[pa.DataType, ...]] = {}
        for f in self.id_features:
            out[f.name] = lists(ints) if f.sequence else ints
        for f in self.float_features:
            out[f.name] = lists(floats) if f.sequence else floats
        for name in self.labels:
            out[name] = label_types
        for f in self.sequence_labels:
            out[f.name] = lists(label_types)
        if self.group_column not in out:
            out[self.group_column] = ints
        if self.weight_column is not None:
            out[self.weight_column] = floats
        return out

    def validate(self) -> None:
        """Checks internal consistency (unique names, positive table sizes, at least one label, sequence
        labels declared as sequences, non-empty group names)."""
        names = (
            [f.name for f in self.id_features]
            + [f.name for f in self.float_features]
            + list(self.labels)
            + [f.name for f in self.sequence_labels]
            + ([self.weight_column] if self.weight_column is not None else [])
        )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"schema declares these columns more than once: {dup}")
        for f in self.id_features:
            if f.num_embeddings <= 0:
                raise ValueError(f"id feature {f.name}: num_embeddings must be > 0, got {f.num_embeddings}")
        if not self.labels and not self.sequence_labels:
            raise ValueError("schema needs at least one label column (labels or sequence_labels)")
        for f in self.sequence_labels:
            if not f.sequence:
                raise ValueError(f"sequence label {f.name}: set sequence: true (sequence labels are list columns)")
        for f in [*self.id_features, *self.float_features, *self.sequence_labels]:
            if f.sequence and not f.group:
                raise ValueError(f"sequence column {f.name}: group must be a non-empty name")
        mappings: dict[str, tuple[IdMapping, str]] = {}
        for f in self.id_features:
            other = mappings.setdefault(f.table_name, (f.mapping, f.name))
            if other[0] != f.mapping:
                raise ValueError(
                    f"features sharing table {f.table_name} disagree on mapping: {other[1]} {other[0].value},"
                    f" {f.name} {f.mapping.value} (an id must land on the same row from either)"
                )
            if f.mapping is IdMapping.mch:
                f.mch.validate(f.name, f.num_embeddings)
                first = self.id_feature(other[1])
                if first.mch != f.mch:
                    raise ValueError(
                        f"features sharing table {f.table_name} disagree on mch options: {first.name} {first.mch},"
                        f" {f.name} {f.mch} (one managed-collision module serves the table)"
                    )
        self.table_sizes()


class DataError(ValueError):
    """Bad input data. The message names the file, the row group or row, and the column."""
