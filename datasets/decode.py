"""Validation and decoding of one unit's arrow table into :class:`datasets.rows.Rows`.

Every unit read is checked for nulls, sequence columns of one group with different lengths in a row,
out-of-range ids (per ``id_policy``, over the whole stored sequence, before truncation and before the
KeyedJaggedTensor is built), labels and sequence labels other than 0/1 (NaN included), non-finite float
features and negative or non-finite weights. Each problem raises one :class:`DataError` naming the file, the
row group, the row (index within the file), the column and what was expected. (Column presence and arrow
types are checked earlier, from the footers: :func:`datasets.files.open_files`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from datasets.config import DataConfig
from datasets.rows import Plan, Rows, tail_plan
from datasets.schema import DataError, IdMapping, IdPolicy, SchemaConfig, hash_ids

__all__ = ["Where", "decode"]




@dataclass(frozen=True)
class Where:
    """Locates rows of a unit for error messages."""

    path: str
    row_group: int
    first_row: int  # index within the file of the unit's first row
    group_first_row: int  # index within the file of the row group's first row

    def row(self, local: int, column: str) -> str:
        r = self.first_row + int(local)
        return (
            f"{self.path}: row group {self.row_group}, row {r} (row index within the file; "
            f"row {r - self.group_first_row} of the row group), column {column!r}"
        )


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_nulls(arr: pa.Array, column: str, where: Where) -> None:
    if arr.null_count:
        row = _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{where.row(row, column)}: null value; expected a non-null value in every row")


def _list_parts(arr: pa.Array, column: str, where: Where) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(flat values, lengths ``[R]``, offsets ``[R + 1]`` relative to the values) of a list column."""
    _check_nulls(arr, column, where)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    flat = arr.flatten()
    if flat.null_count:
        pos = _first(flat.is_null().to_numpy(zero_copy_only=False))
        row = int(np.searchsorted(offsets - offsets[0], pos, side="right")) - 1
        raise DataError(
            f"{where.row(row, column)}: null element at position {pos - int(offsets[row] - offsets[0])} of the "
            f"list; expected no null elements"
        )
    return flat, lengths, offsets - offsets[0]


def _numpy(arr: pa.Array, dtype: np.dtype) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False)).astype(dtype, copy=False)


def _row_of(position: int, offsets: Optional[np.ndarray]) -> int:
    """Row of a flat element position (identity for scalar columns)."""
    if offsets is None:
        return position
    return int(np.searchsorted(offsets, position, side="right")) - 1


def _fix_ids(
    values: np.ndarray,
    lengths: np.ndarray,
    offsets: Optional[np.ndarray],
    num_embeddings: int,
    policy: IdPolicy,
    column: str,
    where: Where,
    range_name: str = "the table's valid range",
) -> tuple[np.ndarray, np.ndarray]:
    """Validates ids against ``[0, num_embeddings)``; returns (ids, per-element rewritten mask).

    Raises:
        DataError: under ``IdPolicy.error``, for the first out-of-range id.
    """
    bad = (values < 0) | (values >= num_embeddings)
    if not bad.any():
        return values, bad
    if policy is IdPolicy.error:
        pos = _first(bad)
        row = _row_of(pos, offsets)
        at = "" if offsets is None else f" (list position {pos - int(offsets[row])})"
        raise DataError(
            f"{where.row(row, column)}: id {int(values[pos])}{at} is outside {range_name} "
            f"[0, {num_embeddings}); expected 0 <= id < {num_embeddings}. "
            f"{int(bad.sum())} ids of this row group are out of range. Set data.id_policy=hash "
            f"(id -> id mod {num_embeddings}) or data.id_policy=clip (id -> clamp(id, 0, {num_embeddings - 1})) "
            f"to rewrite and count them instead of failing"
        )
    if policy is IdPolicy.hash:
        fixed = np.mod(values, num_embeddings)  # floor modulo: non-negative, as Python's %
    else:
        fixed = np.clip(values, 0, num_embeddings - 1)
    return fixed, bad


def _check_binary(values: np.ndarray, offsets: Optional[np.ndarray], column: str, where: Where) -> None:
    """Raises DataError at the first value other than 0 or 1 (NaN included) of a label column."""
    bad = ~((values == 0) | (values == 1))  # NaN compares false
    if bad.any():
        pos = _first(bad)
        row = _row_of(pos, offsets)
        at = "" if offsets is None else f" (list position {pos - int(offsets[row])})"
        raise DataError(f"{where.row(row, column)}: label value {float(values[pos])}{at}; expected 0 or 1")


def decode(
    table: pa.Table, schema: SchemaConfig, cfg: DataConfig, caps: Mapping[str, int], where: Where
) -> Rows:
    """Validates one unit's arrow table and converts it to :class:`Rows` (truncated, ids fixed).

    Args:
        caps: sequence group -> keep the last this many items of its columns (0 = all); every group.
    """
    n = table.num_rows

    def column(name: str) -> pa.Array:
        return table.column(name).combine_chunks()

    # Sequence columns: split, check every group's alignment, and plan each group's truncation once.
    parts: dict[str, tuple[pa.Array, np.ndarray]] = {}  # column -> (flat values, offsets [R + 1])
    group_of: dict[str, str] = {}
    tails: dict[str, Plan] = {}  # group -> (index into the values, kept lengths [R], one object per group)
    for group, names in schema.sequence_groups().items():
        ref: Optional[np.ndarray] = None
        for name in names:
            flat, lengths, offsets = _list_parts(column(name), name, where)
            parts[name] = (flat, offsets)
            group_of[name] = group
            if ref is None:
                ref = lengths
                continue
            misaligned = lengths != ref
            if misaligned.any():
                row = _first(misaligned)
                raise DataError(
                    f"{where.row(row, name)}: {int(lengths[row])} elements, but column {names[0]!r} of the same "
                    f"sequence group {group!r} has {int(ref[row])}; every sequence column of group {group!r} "
                    f"({', '.join(names)}) must have the same length in every row"
                )
        assert ref is not None
        tails[group] = tail_plan(ref, caps.get(group, 0))

    ones = np.ones(n, dtype=np.int64)  # lengths of every scalar id feature
    id_values, id_lengths = [], []
    fixes = np.zeros((n, len(schema.id_features)), dtype=np.int64)
    for i, f in enumerate(schema.id_features):
        if f.sequence:
            flat, offsets = parts[f.name]
            values, lengths = _numpy(flat, np.int64), np.diff(offsets)
        else:
            arr = column(f.name)
            _check_nulls(arr, f.name, where)
            values, lengths, offsets = _numpy(arr, np.int64), ones, None
        if f.mapping is IdMapping.hash:  # raw 64-bit ids: every id hashed into the table, none out of range
            values = hash_ids(values, f.num_embeddings)
        if f.mapping is not IdMapping.mch:
            values, bad = _fix_ids(values, lengths, offsets, f.num_embeddings, cfg.id_policy, f.name, where)
        elif not f.mch.hash_input:  # raw ids reach the managed-collision module, which needs [0, input_hash_size)
            values, bad = _fix_ids(values, lengths, offsets, f.mch.input_hash_size, cfg.id_policy, f.name, where,
                                   "mch.input_hash_size's range")
        else:  # any int64: the model hashes it into [0, input_hash_size) (modules.managed_collision)
            bad = np.zeros(values.shape, dtype=bool)
        if f.sequence:
            index, lengths = tails[group_of[f.name]]
            values = values[index]
            if bad.any():  # count only the rewritten ids that reach the batch
                bad = bad[index]
                fixes[:, i] = np.bincount(np.repeat(np.arange(n, dtype=np.int64), lengths)[bad], minlength=n)
        elif bad.any():
            fixes[:, i] = bad
        id_values.append(values)
        id_lengths.append(lengths)

    seq_values, seq_lengths = [], []
    for f in schema.float_sequences:
        flat, offsets = parts[f.name]
        values = _numpy(flat, np.float32)
        if not np.isfinite(values).all():
            pos = _first(~np.isfinite(values))
            raise DataError(f"{where.row(_row_of(pos, offsets), f.name)}: value {values[pos]}; expected finite floats")
        index, lengths = tails[group_of[f.name]]
        seq_values.append(values[index])
        seq_lengths.append(lengths)

    lab_values, lab_lengths = [], []
    for f in schema.sequence_labels:
        flat, offsets = parts[f.name]
        values = _numpy(flat, np.float64)
        _check_binary(values, offsets, f.name, where)
        index, lengths = tails[group_of[f.name]]
        lab_values.append(values[index].astype(np.float32))
        lab_lengths.append(lengths)

    floats = np.zeros((n, len(schema.float_scalars)), dtype=np.float32)
    for j, f in enumerate(schema.float_scalars):
        arr = column(f.name)
        _check_nulls(arr, f.name, where)
        floats[:, j] = _numpy(arr, np.float32)
        if not np.isfinite(floats[:, j]).all():
            row = _first(~np.isfinite(floats[:, j]))
            raise DataError(f"{where.row(row, f.name)}: value {floats[row, j]}; expected a finite float")

    labels = np.zeros((n, len(schema.labels)), dtype=np.float32)
    for t, name in enumerate(schema.labels):
        arr = column(name)
        _check_nulls(arr, name, where)
        y = _numpy(arr, np.float64)
        _check_binary(y, None, name, where)
        labels[:, t] = y

    groups_arr = column(schema.group_column)
    _check_nulls(groups_arr, schema.group_column, where)
    groups = _numpy(groups_arr, np.int64)

    if schema.weight_column is None:
        weights = np.ones(n, dtype=np.float32)
    else:
        arr = column(schema.weight_column)
        _check_nulls(arr, schema.weight_column, where)
        weights = _numpy(arr, np.float32)
        bad = ~(np.isfinite(weights) & (weights >= 0))
        if bad.any():
            row = _first(bad)
            raise DataError(
                f"{where.row(row, schema.weight_column)}: weight {weights[row]}; expected a finite weight >= 0"
            )

    return Rows(
        id_values=id_values,
        id_lengths=id_lengths,
        seq_values=seq_values,
        seq_lengths=seq_lengths,
        floats=floats,
        labels=labels,
        lab_values=lab_values,
        lab_lengths=lab_lengths,
        groups=groups,
        weights=weights,
        valid=np.ones(n, dtype=bool),
        fixes=fixes,
    )
