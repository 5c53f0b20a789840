"""Streaming pyarrow parquet readers yielding :class:`datasets.batch.Batch`, split by rank and worker.

Unit of work
    A *unit* is a range of rows of one row group of one file: ``(file, row_group, start, stop)``. Normally a
    unit is a whole row group; when a data set has fewer row groups than there are readers, the largest
    units are halved until every reader gets at least one. Units are read one at a time
    (``ParquetFile.read_row_group``), so at most one row group per reader is in memory, never a whole file.

Readers
    A rank with ``W = max(num_workers, 1)`` DataLoader workers has ``W`` readers; the global reader index is
    ``rank * W + worker``, out of ``R = world_size * W``. Reader ``r`` reads units ``r, r + R, r + 2R, ...``
    of the (per-epoch shuffled, for training) unit list, so readers' shares are disjoint and together
    cover every unit exactly once per epoch.

Ordering convention and truncation
    Sequence columns are chronological: the oldest behaviour first and the most recent behaviour last.
    Sequence columns form groups (:meth:`SchemaConfig.sequence_groups`) whose columns have equal lengths in
    every row. Each group ``g`` is truncated to the *last* ``L_g`` items of every one of its columns (the
    most recent behaviours; the columns stay aligned), where ``L_g`` is the smaller positive one of
    ``max_sequence_length`` and the loader's ``sequence_caps[g]`` (a model's declared need; 0 or absent =
    no cap); neither positive keeps everything. Rows keep the file order except where training shuffles
    them.

Training stream (:func:`train_loader`)
    Infinite. Reader ``r`` walks epochs ``e = 0, 1, ...``; in epoch ``e`` the unit list is permuted with
    ``np.random.default_rng([seed, e])`` and the rows of a unit with
    ``np.random.default_rng([seed, e, file, row_group, start])`` (when ``shuffle``). Rows are concatenated
    across units and epochs and cut into batches of exactly ``batch_size`` rows, so the stream is a pure
    function of ``(seed, rank, world_size, num_workers, step)``. The DataLoader yields batch ``k`` of a rank
    from worker ``k % W``; resuming at ``start_step = s`` rotates the workers' roles by ``s`` and lets each
    skip its already consumed batches using row-group metadata only (the one unit a resume point falls
    inside is read; skipped units are not).

Evaluation stream (:func:`eval_loader`)
    Finite, unshuffled: every row of ``eval_paths`` exactly once across all ranks and workers. A reader's
    last batch is padded to ``batch_size`` with copies of a real row marked ``valid = False`` and
    ``weight = 0``; readers with fewer batches than the busiest reader append whole padding batches, so
    every rank yields the same number of batches (``W * max_reader_batches``) and collectives in a sharded
    model stay in lockstep.

Validation
    File readability and every column's presence and arrow type are checked when a loader is built,
    before anything is yielded. Every unit read is checked for nulls, sequence columns of one group with
    different lengths in a row, out-of-range ids (per ``id_policy``, over the whole stored sequence,
    before truncation and before the KeyedJaggedTensor is built), labels and sequence labels other than 0/1
    (NaN included), non-finite float features and negative or non-finite weights. Each problem raises one
    :class:`DataError` naming the file, the row group, the row (index within the file), the column and what
    was expected.
"""

from __future__ import annotations

import glob
import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.batch import Batch
from datasets.config import DataConfig
from datasets.schema import DataError, IdPolicy, SchemaConfig

__all__ = ["ParquetStream", "count_rows", "eval_loader", "expand_paths", "train_loader"]


# --------------------------------------------------------------------------------------------- files


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Expands files and glob patterns, each pattern's matches sorted, duplicates dropped.

    Raises:
        DataError: a pattern matches no file, or no pattern is given.
    """
    if not patterns:
        raise DataError("no parquet paths given (data.train_paths / data.eval_paths is empty)")
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"{pattern}: the pattern matches no file")
        for m in matches:
            if m not in out:
                out.append(m)
    return out


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot open as a parquet file: {e}") from None


def count_rows(paths: Sequence[str]) -> int:
    """Total rows of the given parquet files or glob patterns, from their footers (no data is read)."""
    return sum(_open_parquet(p).metadata.num_rows for p in expand_paths(paths))


def _normalise_type(t: pa.DataType) -> pa.DataType:
    """Drops list field names and nullability so that types compare by structure only."""
    if pa.types.is_list(t):
        return pa.list_(t.value_type)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_type)
    return t


def _check_arrow_schema(path: str, arrow_schema: pa.Schema, expected: dict[str, tuple[pa.DataType, ...]]) -> None:
    """Raises DataError unless every expected column is present once with one of its accepted types."""
    names = arrow_schema.names
    for column, types in expected.items():
        accepted = " or ".join(str(t) for t in types)
        count = names.count(column)
        if count == 0:
            raise DataError(
                f"{path}: missing column {column!r} (expected arrow type {accepted}); the file has columns {names}"
            )
        if count > 1:
            raise DataError(f"{path}: column {column!r} appears {count} times; expected it once ({accepted})")
        found = arrow_schema.field(column).type
        if _normalise_type(found) not in [_normalise_type(t) for t in types]:
            raise DataError(f"{path}: column {column!r} has arrow type {found}, expected {accepted}")


@dataclass(frozen=True)
class _FileMeta:
    path: str
    row_group_rows: tuple[int, ...]  # rows of each row group

    def row_group_offset(self, row_group: int) -> int:
        """Index within the file of the row group's first row."""
        return sum(self.row_group_rows[:row_group])


@dataclass(frozen=True)
class _Unit:
    file: int
    row_group: int
    start: int  # first row, within the row group
    stop: int  # one past the last row, within the row group

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def _open_files(paths: Sequence[str], schema: SchemaConfig) -> list[_FileMeta]:
    """Opens every file's footer and checks its columns against the schema (no data is read)."""
    expected = schema.arrow_types()
    files = []
    for path in expand_paths(paths):
        pf = _open_parquet(path)
        _check_arrow_schema(path, pf.schema_arrow, expected)
        md = pf.metadata
        files.append(_FileMeta(path, tuple(md.row_group(g).num_rows for g in range(md.num_row_groups))))
    return files


def _make_units(files: Sequence[_FileMeta], num_readers: int) -> list[_Unit]:
    """One unit per non-empty row group, largest units halved until there are at least ``num_readers``.

    Raises:
        DataError: fewer rows than readers.
    """
    units = [
        _Unit(f, g, 0, n) for f, meta in enumerate(files) for g, n in enumerate(meta.row_group_rows) if n > 0
    ]
    total = sum(u.num_rows for u in units)
    if total < num_readers:
        raise DataError(
            f"{[m.path for m in files]}: {total} rows cannot be split across {num_readers} readers "
            f"(world_size x max(num_workers, 1)); every reader needs at least one row"
        )
    while len(units) < num_readers:
        i = max(range(len(units)), key=lambda j: units[j].num_rows)  # first largest: deterministic
        u = units[i]
        mid = u.start + u.num_rows // 2
        units[i : i + 1] = [replace(u, stop=mid), replace(u, start=mid)]
    return units


# ---------------------------------------------------------------------------------------------- rows


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# A jagged selection is planned once per distinct lengths array and applied to every column sharing it
# (aligned sequence columns share one lengths object): (positions or slice into values, new lengths).
_Plan = tuple[object, np.ndarray]


def _gather_plan(starts: np.ndarray, new_lengths: np.ndarray) -> _Plan:
    """Positions of rows that start at value index ``starts [R']`` with ``new_lengths [R']`` items each."""
    new_offsets = _offsets(new_lengths)
    pos = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], new_lengths)
    return pos, new_lengths


def _take_plan(lengths: np.ndarray, idx: np.ndarray) -> _Plan:
    """Rows ``idx`` (any order, repeats allowed) of a jagged array with row lengths ``lengths [R]``."""
    return _gather_plan(_offsets(lengths)[:-1][idx], lengths[idx])


def _slice_plan(lengths: np.ndarray, a: int, b: int) -> _Plan:
    """Rows ``a:b``: a contiguous slice of the values (no copy)."""
    start = int(lengths[:a].sum())
    return slice(start, start + int(lengths[a:b].sum())), lengths[a:b]


def _tail_plan(lengths: np.ndarray, max_len: int) -> _Plan:
    """The last ``max_len`` items of every row (the most recent behaviours); ``max_len <= 0`` keeps all."""
    if max_len <= 0 or len(lengths) == 0 or int(lengths.max()) <= max_len:
        return slice(None), lengths
    cut = np.maximum(lengths - max_len, 0)
    return _gather_plan(_offsets(lengths)[:-1] + cut, lengths - cut)


_PlanCache = dict[int, tuple[np.ndarray, _Plan]]


def _apply_plans(
    values: list[np.ndarray],
    lengths: list[np.ndarray],
    plan_fn: Callable[[np.ndarray], _Plan],
    cache: _PlanCache,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Applies ``plan_fn(lengths)`` to each (values, lengths) pair, planning once per lengths object."""
    out_v: list[np.ndarray] = []
    out_n: list[np.ndarray] = []
    for v, n in zip(values, lengths):
        if id(n) not in cache:
            cache[id(n)] = (n, plan_fn(n))  # holding n keeps its id unique while the cache lives
        index, new_n = cache[id(n)][1]
        out_v.append(v[index])
        out_n.append(new_n)
    return out_v, out_n


@dataclass
class _Rows:
    """Decoded, validated rows in flat numpy form; the unit of shuffling and batching.

    Shapes: R rows, N id features, S float sequence features, F scalar floats, T tasks, Q sequence labels,
    E_i items of jagged feature i. Jagged columns of one sequence group share one lengths array object.
    """

    id_values: list[np.ndarray]  # N x [E_i] int64 (scalar features: E_i = R)
    id_lengths: list[np.ndarray]  # N x [R] int64
    seq_values: list[np.ndarray]  # S x [E_i] float32
    seq_lengths: list[np.ndarray]  # S x [R] int64
    floats: np.ndarray  # [R, F] float32
    labels: np.ndarray  # [R, T] float32
    lab_values: list[np.ndarray]  # Q x [E_i] float32, sequence labels
    lab_lengths: list[np.ndarray]  # Q x [R] int64
    groups: np.ndarray  # [R] int64
    weights: np.ndarray  # [R] float32
    valid: np.ndarray  # [R] bool
    fixes: np.ndarray  # [R, N] int64, ids rewritten per row and feature

    def __len__(self) -> int:
        return len(self.labels)

    def _map(self, plan_fn: Callable[[np.ndarray], _Plan], dense: Callable[[np.ndarray], np.ndarray]) -> "_Rows":
        cache: _PlanCache = {}
        id_values, id_lengths = _apply_plans(self.id_values, self.id_lengths, plan_fn, cache)
        seq_values, seq_lengths = _apply_plans(self.seq_values, self.seq_lengths, plan_fn, cache)
        lab_values, lab_lengths = _apply_plans(self.lab_values, self.lab_lengths, plan_fn, cache)
        return _Rows(
            id_values=id_values,
            id_lengths=id_lengths,
            seq_values=seq_values,
            seq_lengths=seq_lengths,
            floats=dense(self.floats),
            labels=dense(self.labels),
            lab_values=lab_values,
            lab_lengths=lab_lengths,
            groups=dense(self.groups),
            weights=dense(self.weights),
            valid=dense(self.valid),
            fixes=dense(self.fixes),
        )

    def take(self, idx: np.ndarray) -> "_Rows":
        return self._map(lambda n: _take_plan(n, idx), lambda x: x[idx])

    def slice(self, a: int, b: int) -> "_Rows":
        return self._map(lambda n: _slice_plan(n, a, b), lambda x: x[a:b])

    @staticmethod
    def concat(parts: Sequence["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]

        def cat(get: Callable[[_Rows], list[np.ndarray]]) -> list[np.ndarray]:
            return [np.concatenate(xs) for xs in zip(*(get(p) for p in parts))]

        shared: dict[tuple[int, ...], tuple[tuple[np.ndarray, ...], np.ndarray]] = {}  # shared lengths stay shared

        def cat_lengths(get: Callable[[_Rows], list[np.ndarray]]) -> list[np.ndarray]:
            out = []
            for ns in zip(*(get(p) for p in parts)):
                key = tuple(id(n) for n in ns)
                if key not in shared:
                    shared[key] = (ns, np.concatenate(ns))
                out.append(shared[key][1])
            return out

        return _Rows(
            id_values=cat(lambda p: p.id_values),
            id_lengths=cat_lengths(lambda p: p.id_lengths),
            seq_values=cat(lambda p: p.seq_values),
            seq_lengths=cat_lengths(lambda p: p.seq_lengths),
            floats=np.concatenate([p.floats for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            lab_values=cat(lambda p: p.lab_values),
            lab_lengths=cat_lengths(lambda p: p.lab_lengths),
            groups=np.concatenate([p.groups for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            valid=np.concatenate([p.valid for p in parts]),
            fixes=np.concatenate([p.fixes for p in parts]),
        )

    def padding(self, count: int) -> "_Rows":
        """``count`` copies of this chunk's first row, marked invalid with weight 0 and no id fixes."""
        pad = self.take(np.zeros(count, dtype=np.int64))
        pad.weights = np.zeros(count, dtype=np.float32)
        pad.valid = np.zeros(count, dtype=bool)
        pad.fixes = np.zeros_like(pad.fixes)
        return pad

    def to_batch(self, schema: SchemaConfig) -> Batch:
        """The torch form; shapes as documented on :class:`Batch` with ``B = len(self)``."""
        b = len(self)

        def kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray], dtype: torch.dtype) -> KeyedJaggedTensor:
            # values [sum of lengths], lengths [len(keys) * B] key-major; stride=B keeps B when keys == []
            if not keys:
                return KeyedJaggedTensor(
                    keys=[], values=torch.empty(0, dtype=dtype), lengths=torch.empty(0, dtype=torch.int32), stride=b
                )
            return KeyedJaggedTensor(
                keys=keys,
                values=torch.from_numpy(np.concatenate(values)).to(dtype),
                lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                stride=b,
            )

        return Batch(
            sparse_features=kjt([f.name for f in schema.id_features], self.id_values, self.id_lengths, torch.int64),
            float_sequences=kjt([f.name for f in schema.float_sequences], self.seq_values, self.seq_lengths, torch.float32),
            float_features=torch.from_numpy(np.require(self.floats, np.float32, ["C", "W"])),
            labels=torch.from_numpy(np.require(self.labels, np.float32, ["C", "W"])),
            sequence_labels=kjt(
                [f.name for f in schema.sequence_labels], self.lab_values, self.lab_lengths, torch.float32
            ),
            group_ids=torch.from_numpy(np.require(self.groups, np.int64, ["C", "W"])),
            weights=torch.from_numpy(np.require(self.weights, np.float32, ["C", "W"])),
            valid=torch.from_numpy(np.require(self.valid, bool, ["C", "W"])),
            id_fixes=torch.from_numpy(np.require(self.fixes.sum(axis=0), np.int64, ["C", "W"])),
        )


# ------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class _Where:
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


def _check_nulls(arr: pa.Array, column: str, where: _Where) -> None:
    if arr.null_count:
        row = _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{where.row(row, column)}: null value; expected a non-null value in every row")


def _list_parts(arr: pa.Array, column: str, where: _Where) -> tuple[pa.Array, np.ndarray, np.ndarray]:
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
    where: _Where,
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
            f"{where.row(row, column)}: id {int(values[pos])}{at} is outside the table's valid range "
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


def _check_binary(values: np.ndarray, offsets: Optional[np.ndarray], column: str, where: _Where) -> None:
    """Raises DataError at the first value other than 0 or 1 (NaN included) of a label column."""
    bad = ~((values == 0) | (values == 1))  # NaN compares false
    if bad.any():
        pos = _first(bad)
        row = _row_of(pos, offsets)
        at = "" if offsets is None else f" (list position {pos - int(offsets[row])})"
        raise DataError(f"{where.row(row, column)}: label value {float(values[pos])}{at}; expected 0 or 1")


def _decode(
    table: pa.Table, schema: SchemaConfig, cfg: DataConfig, caps: Mapping[str, int], where: _Where
) -> _Rows:
    """Validates one unit's arrow table and converts it to :class:`_Rows` (truncated, ids fixed).

    Args:
        caps: sequence group -> keep the last this many items of its columns (0 = all); every group.
    """
    n = table.num_rows

    def column(name: str) -> pa.Array:
        return table.column(name).combine_chunks()

    # Sequence columns: split, check every group's alignment, and plan each group's truncation once.
    parts: dict[str, tuple[pa.Array, np.ndarray]] = {}  # column -> (flat values, offsets [R + 1])
    group_of: dict[str, str] = {}
    tails: dict[str, _Plan] = {}  # group -> (index into the values, kept lengths [R], one object per group)
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
        tails[group] = _tail_plan(ref, caps.get(group, 0))

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
        values, bad = _fix_ids(values, lengths, offsets, f.num_embeddings, cfg.id_policy, f.name, where)
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
            raise DataError(f"{where.row(row, schema.weight_column)}: weight {weights[row]}; expected a finite weight >= 0")

    return _Rows(
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


def _rebatch(parts: Iterable[_Rows], batch_size: int, pad_last: bool) -> Iterator[_Rows]:
    """Cuts a stream of row chunks into chunks of exactly ``batch_size`` rows (chunks may span parts).

    With ``pad_last`` a final partial chunk is padded with invalid copies of its first row.
    """
    pending: list[_Rows] = []
    have = 0
    for part in parts:
        pos = 0
        while pos < len(part):
            take = min(batch_size - have, len(part) - pos)
            pending.append(part if (pos == 0 and take == len(part)) else part.slice(pos, pos + take))
            have += take
            pos += take
            if have == batch_size:
                yield _Rows.concat(pending)
                pending, have = [], 0
    if pad_last and have:
        yield _Rows.concat(pending + [pending[0].padding(batch_size - have)])


# ------------------------------------------------------------------------------------------- dataset


def _group_caps(cfg: DataConfig, sequence_caps: Mapping[str, int]) -> dict[str, int]:
    """Every sequence group -> the number of last items kept (0 = all): the smaller positive one of
    ``cfg.max_sequence_length`` and ``sequence_caps[group]``."""
    groups = cfg.schema.sequence_groups()
    unknown = sorted(set(sequence_caps) - set(groups))
    if unknown:
        raise ValueError(
            f"sequence_caps names unknown sequence groups {unknown}; the schema's groups are {list(groups)}"
        )
    out = {}
    for group in groups:
        cap = int(sequence_caps.get(group, 0))
        if cap < 0:
            raise ValueError(f"sequence_caps[{group!r}] must be >= 0 (0 = no cap), got {cap}")
        limits = [x for x in (cfg.max_sequence_length, cap) if x > 0]
        out[group] = min(limits) if limits else 0
    return out


class ParquetStream(IterableDataset):
    """An IterableDataset of :class:`Batch` over parquet files, one rank's share.

    Build it with :func:`train_loader` / :func:`eval_loader`. Construction reads only footers and checks
    the schema; data is read lazily, one unit at a time, in the iterating process (a DataLoader worker).

    Args:
        cfg: the data config (schema, batch size, workers, shuffle, seed, id policy, truncation).
        paths: files or glob patterns.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.
        train: True for the infinite shuffled training stream, False for one finite unshuffled pass.
        start_step: training only: batches of this rank's stream to skip (resume).
        sequence_caps: sequence group -> keep at most the last this many items of every column of the group
            (a model's declared need; 0 = no cap), combined with ``cfg.max_sequence_length`` by taking the
            smaller positive one.

    Raises:
        ValueError: bad rank, sizes or ``start_step``; ``sequence_caps`` names a group the schema does not
            have, or holds a negative cap.
    """

    def __init__(
        self,
        cfg: DataConfig,
        paths: Sequence[str],
        rank: int,
        world_size: int,
        train: bool,
        start_step: int = 0,
        sequence_caps: Optional[Mapping[str, int]] = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if cfg.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        if start_step < 0 or (start_step and not train):
            raise ValueError(f"start_step must be >= 0 and only used for training, got {start_step}")
        cfg.schema.validate()
        self.caps = _group_caps(cfg, sequence_caps or {})
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.start_step = start_step
        self.workers = max(cfg.num_workers, 1)
        self.num_readers = world_size * self.workers
        self.files = _open_files(paths, cfg.schema)
        self.units = _make_units(self.files, self.num_readers)
        self.columns = list(cfg.schema.arrow_types())
        self._handles: dict[int, pq.ParquetFile] = {}

    # -- shares

    def _share(self, epoch: int, reader: int) -> list[_Unit]:
        """The units reader ``reader`` reads in ``epoch`` (in reading order)."""
        if self.train and self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.units))
            return [self.units[i] for i in order[reader :: self.num_readers]]
        return self.units[reader :: self.num_readers]

    def eval_batches_per_reader(self) -> int:
        """Batches every reader yields in evaluation: the busiest reader's ``ceil(rows / batch_size)``."""
        rows = [sum(u.num_rows for u in self._share(0, r)) for r in range(self.num_readers)]
        return max(math.ceil(n / self.cfg.batch_size) for n in rows)

    # -- reading

    def _read_unit(self, unit: _Unit) -> _Rows:
        meta = self.files[unit.file]
        if unit.file not in self._handles:
            if len(self._handles) >= 8:
                self._handles.pop(next(iter(self._handles)))
            self._handles[unit.file] = _open_parquet(meta.path)
        try:
            table = self._handles[unit.file].read_row_group(unit.row_group, columns=self.columns)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{meta.path}: cannot read row group {unit.row_group}: {e}") from None
        expected_rows = meta.row_group_rows[unit.row_group]
        if table.num_rows != expected_rows:
            raise DataError(
                f"{meta.path}: row group {unit.row_group} has {table.num_rows} rows, its footer said "
                f"{expected_rows} when the loader was built (was the file rewritten?)"
            )
        if unit.num_rows != table.num_rows:
            table = table.slice(unit.start, unit.num_rows)
        group_first = meta.row_group_offset(unit.row_group)
        where = _Where(meta.path, unit.row_group, group_first + unit.start, group_first)
        return _decode(table, self.cfg.schema, self.cfg, self.caps, where)

    def _train_parts(self, reader: int, skip_rows: int) -> Iterator[_Rows]:
        """Reader ``reader``'s infinite row stream, its first ``skip_rows`` rows dropped (footers only)."""
        for epoch in itertools.count():
            share = self._share(epoch, reader)
            epoch_rows = sum(u.num_rows for u in share)
            if skip_rows >= epoch_rows:
                skip_rows -= epoch_rows
                continue
            for unit in share:
                if skip_rows >= unit.num_rows:
                    skip_rows -= unit.num_rows
                    continue
                rows = self._read_unit(unit)
                if self.cfg.shuffle:
                    seed = [self.cfg.seed, epoch, unit.file, unit.row_group, unit.start]
                    rows = rows.take(np.random.default_rng(seed).permutation(len(rows))[skip_rows:])
                elif skip_rows:
                    rows = rows.slice(skip_rows, len(rows))
                skip_rows = 0
                yield rows

    def reader_batches(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """The batches DataLoader worker ``worker`` of ``num_workers`` yields on this rank.

        ``__iter__`` calls this with the DataLoader's worker info; tests call it directly to emulate
        workers in one process.
        """
        if num_workers != self.workers or not 0 <= worker < num_workers:
            raise RuntimeError(
                f"the stream was built for {self.workers} worker(s) per rank (data.num_workers="
                f"{self.cfg.num_workers}) but runs as worker {worker} of {num_workers}"
            )
        schema, bsz = self.cfg.schema, self.cfg.batch_size
        if self.train:
            logical = (worker + self.start_step) % num_workers  # resumed stream starts at worker s % W
            skip_batches = (self.start_step - logical + num_workers - 1) // num_workers
            reader = self.rank * num_workers + logical
            for rows in _rebatch(self._train_parts(reader, skip_batches * bsz), bsz, pad_last=False):
                yield rows.to_batch(schema)
            return
        reader = self.rank * num_workers + worker
        target = self.eval_batches_per_reader()
        parts = (self._read_unit(u) for u in self._share(0, reader))
        count = 0
        template: Optional[_Rows] = None
        for rows in _rebatch(parts, bsz, pad_last=True):
            template = rows
            count += 1
            yield rows.to_batch(schema)
        assert template is not None  # every reader has at least one row (_make_units)
        while count < target:
            count += 1
            yield template.padding(bsz).to_batch(schema)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            return self.reader_batches(0, 1)
        return self.reader_batches(info.id, info.num_workers)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files are per process
        return state


def _loader(dataset: ParquetStream, cfg: DataConfig) -> DataLoader:
    # Its own generator: creating an iterator must not draw from the global RNG (dropout's), which would make
    # a resumed run's random stream depend on when its loaders were created.
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, generator=generator)


def train_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    start_step: int = 0,
    sequence_caps: Optional[Mapping[str, int]] = None,
) -> Iterable[Batch]:
    """The infinite, deterministic training stream of one rank (see the module docstring).

    Every batch has exactly ``cfg.batch_size`` rows, all valid. The stream resumed with ``start_step = s``
    equals the fresh stream with its first ``s`` batches dropped.

    Args:
        cfg: data config; ``cfg.train_paths`` are read.
        rank: this rank.
        world_size: number of ranks.
        start_step: batches already consumed by this rank (resume).
        sequence_caps: sequence group -> keep at most the last this many items of every column of the
            group (e.g. ``{"history": 50}`` for a model that reads 50 behaviours); combined with
            ``cfg.max_sequence_length`` by taking the smaller positive one. Ids are validated over the whole
            stored sequence regardless.

    Returns:
        A ``DataLoader`` (``batch_size=None``, ``cfg.num_workers`` workers) yielding :class:`Batch`.

    Raises:
        DataError: unreadable file, missing or mistyped column (before anything is yielded); bad values
            while iterating.
        ValueError: ``sequence_caps`` names a group the schema does not have (the message lists them).
    """
    ds = ParquetStream(
        cfg, cfg.train_paths, rank, world_size, train=True, start_step=start_step, sequence_caps=sequence_caps
    )
    return _loader(ds, cfg)


def eval_loader(
    cfg: DataConfig, rank: int, world_size: int, sequence_caps: Optional[Mapping[str, int]] = None
) -> Iterable[Batch]:
    """One finite, unshuffled pass over ``cfg.eval_paths``, this rank's share (see the module docstring).

    Every row appears exactly once across all ranks and workers with ``valid = True``; padding rows have
    ``valid = False`` and ``weights = 0``. Every rank yields the same number of batches.

    Args:
        cfg: data config; ``cfg.eval_paths`` are read.
        rank: this rank.
        world_size: number of ranks.
        sequence_caps: as for :func:`train_loader`.

    Returns:
        A ``DataLoader`` (``batch_size=None``, ``cfg.num_workers`` workers) yielding :class:`Batch`.

    Raises:
        DataError: as for :func:`train_loader`.
        ValueError: ``sequence_caps`` names a group the schema does not have (the message lists them).
    """
    return _loader(ParquetStream(cfg, cfg.eval_paths, rank, world_size, train=False, sequence_caps=sequence_caps), cfg)
