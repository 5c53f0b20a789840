"""Parquet file discovery, footers and the units readers are given.

A *unit* is a range of rows of one row group of one file: ``(file, row_group, start, stop)``. Normally a unit
is a whole row group; when a data set has fewer row groups than there are readers, :func:`make_units` halves
the largest units until every reader gets at least one. Units are read one at a time
(``ParquetFile.read_row_group``), so at most one row group per reader is in memory, never a whole file.
Everything here reads footers only.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, replace
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from datasets.schema import DataError, SchemaConfig

__all__ = [
    "FileMeta",
    "Unit",
    "count_rows",
    "expand_paths",
    "make_units",
    "open_files",
    "open_parquet",
    "row_group_units",
]


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


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot open as a parquet file: {e}") from None


def count_rows(paths: Sequence[str]) -> int:
    """Total rows of the given parquet files or glob patterns, from their footers (no data is read)."""
    return sum(open_parquet(p).metadata.num_rows for p in expand_paths(paths))


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
class FileMeta:
    path: str
    row_group_rows: tuple[int, ...]  # rows of each row group

    def row_group_offset(self, row_group: int) -> int:
        """Index within the file of the row group's first row."""
        return sum(self.row_group_rows[:row_group])


@dataclass(frozen=True)
class Unit:
    file: int
    row_group: int
    start: int  # first row, within the row group
    stop: int  # one past the last row, within the row group

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def open_files(paths: Sequence[str], schema: SchemaConfig) -> list[FileMeta]:
    """Opens every file's footer and checks its columns against the schema (no data is read)."""
    expected = schema.arrow_types()
    files = []
    for path in expand_paths(paths):
        pf = open_parquet(path)
        _check_arrow_schema(path, pf.schema_arrow, expected)
        md = pf.metadata
        files.append(FileMeta(path, tuple(md.row_group(g).num_rows for g in range(md.num_row_groups))))
    return files


def row_group_units(files: Sequence[FileMeta]) -> list[Unit]:
    """One unit per non-empty row group, in file order."""
    return [Unit(f, g, 0, n) for f, meta in enumerate(files) for g, n in enumerate(meta.row_group_rows) if n > 0]


def make_units(files: Sequence[FileMeta], num_readers: int) -> list[Unit]:
    """One unit per non-empty row group, largest units halved until there are at least ``num_readers``.

    Raises:
        DataError: fewer rows than readers.
    """
    units = row_group_units(files)
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
