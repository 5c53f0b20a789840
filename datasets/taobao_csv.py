"""Reading side of the converters (:mod:`datasets.taobao`, :mod:`datasets.tmall`, :mod:`datasets.kuairand`,
:mod:`datasets.movielens`): delimited text read and validated block by block, and the out-of-core sort of
rows that are not in ``(user_id, timestamp)`` order.

The text is streamed with ``pyarrow.csv.open_csv``, ``block_size`` bytes at a time (:func:`_csv_batches`);
every value is checked and the first bad one raises one :class:`DataError` naming the file, the line, the
column and the expected value (a row with a wrong field count is located by re-reading the file with
:mod:`csv`, as pyarrow's message has no line number). A missing, empty or unreadable file, and a file whose
first line is not the expected header, are a :class:`DataError` too. :func:`_blocks` reads Taobao's
UserBehavior CSV (no header; ids non-negative integers, timestamps integers, ``behavior_type`` in
``pv|buy|cart|fav``).

Sorting: sorted runs of ``sort_rows`` rows (each stably by ``(users, ts)``), written as LZ4 Arrow files into
a folder the caller chooses (the converter's temporary output folder), then a k-way merge holding one record
batch per run, so memory is bounded by ``sort_rows``. Ties keep the input order. It works on any dataclass
of equal-length numpy arrays with ``users`` and ``ts`` fields (:class:`_Block` is Taobao's).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datasets.canonical import BEHAVIOR_TYPES
from datasets.schema import DataError

_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
#: A non-negative integer id, as text (at most 18 digits: fits int64).
ID_PATTERN = r"^[0-9]{1,18}$"

# ------------------------------------------------------------------------------------------------ CSV

@dataclass
class _Block:
    """Validated rows of one CSV block, or of the sorted data. Shapes: R rows of the block."""

    users: np.ndarray  # [R] int64 raw ids
    items: np.ndarray  # [R] int64
    cats: np.ndarray  # [R] int64
    pv: np.ndarray  # [R] bool
    ts: np.ndarray  # [R] int64

    def slice(self, start: int, stop: Optional[int] = None) -> "_Block":
        return _slice(self, start, stop)


B = TypeVar("B")


def _fields(block_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(block_type)]


def _slice(b: B, start: int, stop: Optional[int] = None) -> B:
    return type(b)(*(getattr(b, k)[start:stop] for k in _fields(type(b))))


def _take(b: B, index: np.ndarray) -> B:
    return type(b)(*(getattr(b, k)[index] for k in _fields(type(b))))


def _concat(blocks: list[B]) -> B:
    cls = type(blocks[0])
    return cls(*(np.concatenate([getattr(b, k) for b in blocks]) for k in _fields(cls)))


def _locate_bad_line(path: str, n_fields: int, delimiter: str = ",") -> tuple[int, int, str]:
    """(line number, field count, text) of the first line without ``n_fields`` fields (error path only;
    streams)."""
    try:
        with open(path, newline="", errors="replace") as fh:
            for number, fields in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
                if len(fields) != n_fields:
                    return number, len(fields), delimiter.join(fields)[:200]
    except (OSError, csv.Error):
        pass
    return -1, -1, ""


def _input_problem(path: str, what: str = "the UserBehavior CSV file", rows: str = ",".join(_COLUMNS)) -> Optional[str]:
    """Why ``path`` cannot be read at all (missing, a folder, unreadable, empty), or None."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return f"is a folder; expected {what}"
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if st.st_size == 0:
        return f"empty file; expected rows {rows}"
    return None


def _read_header(path: str, delimiter: str, required: list[str]) -> list[str]:
    """The column names of the header line of ``path``; raises DataError unless it names every ``required``."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    names = next(csv.reader([first], delimiter=delimiter), [])
    names = [n.strip().lstrip("\ufeff") for n in names]
    missing = [c for c in required if c not in names]
    if missing:
        kind = "missing header" if not set(names) & set(required) else f"header lacks column(s) {','.join(missing)}"
        raise DataError(
            f"{path}: line 1: {kind} (got {first.strip()[:200]!r}); expected a header naming {','.join(required)}"
        )
    return names


def _csv_batches(
    path: str,
    columns: Optional[list[str]],
    block_size: int,
    *,
    required: Optional[list[str]] = None,
    delimiter: str = ",",
    what: str = "the UserBehavior CSV file",
    layout: Optional[str] = None,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Streams a delimited file as record batches of strings: ``(line number of the batch's first row, batch)``.

    Args:
        columns: the file's columns when it has no header; None: the first line is a header, which must name
            every ``required`` column.
        required: the columns read (default: all of ``columns``).
        what: the file, for the message about a folder ("the ... file").
        layout: what a line holds, for the message about a wrong field count (default
            ``"N columns a,b,..."``).

    Raises:
        DataError: missing, empty or unreadable file; missing header; a line with a wrong field count.
    """
    problem = _input_problem(path, what, layout or delimiter.join(columns or required or []))
    if problem:
        raise DataError(f"{path}: {problem}")
    names = columns if columns is not None else _read_header(path, delimiter, required or [])
    required = list(required or names)
    layout = layout or f"{len(names)} columns {','.join(names)}"
    first_line = 1 if columns is not None else 2

    def parse_error(e: pa.ArrowException, after: int) -> DataError:
        """The first line with a wrong field count (pyarrow's message has no line number), else ``e``."""
        wrong_count = "columns, got" in str(e)
        number, count, text = _locate_bad_line(path, len(names), delimiter) if wrong_count else (-1, -1, "")
        if number > after:
            return DataError(f"{path}: line {number}: {count} fields ({text!r}); expected {layout}")
        return DataError(f"{path}: cannot read as CSV from line {after + 1} on: {' '.join(str(e).split())}")

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, block_size=block_size, skip_rows=first_line - 1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in required}, include_columns=required
            ),
        )
    except pa.ArrowException as e:
        raise parse_error(e, first_line - 1) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    line = first_line
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as e:
            raise parse_error(e, line - 1) from None
        yield line, batch
        line += batch.num_rows


def _check(path: str, batch: pa.RecordBatch, line: int, column: str, ok: pa.Array, expected: str) -> None:
    """Raises DataError at the first row of ``batch`` (first row on ``line``) where ``ok`` is false."""
    good = ok.to_numpy(zero_copy_only=False)
    if not good.all():
        i = int(np.argmin(good))
        value = batch.column(column)[i].as_py()
        raise DataError(f"{path}: line {line + i}, column {column!r}: value {value!r}; expected {expected}")


def _check_pattern(path: str, batch: pa.RecordBatch, line: int, column: str, pattern: str, expected: str) -> None:
    _check(path, batch, line, column, pc.match_substring_regex(batch.column(column), pattern), expected)


def _ints(batch: pa.RecordBatch, column: str) -> np.ndarray:
    return pc.cast(batch.column(column), pa.int64()).to_numpy()


def _blocks(path: str, block_size: int) -> Iterator[_Block]:
    """Streams Taobao's UserBehavior CSV block by block, validating every value.

    Raises:
        DataError: missing, empty or unreadable file, or the first malformed row (line, column, expected
            value).
    """
    for line, batch in _csv_batches(path, _COLUMNS, block_size):
        for column in ("user_id", "item_id", "category_id"):
            _check_pattern(path, batch, line, column, ID_PATTERN, "a non-negative integer id")
        _check_pattern(path, batch, line, "timestamp", r"^-?[0-9]{1,18}$", "an integer unix timestamp (seconds)")
        btype = batch.column("behavior_type")
        _check(path, batch, line, "behavior_type", pc.is_in(btype, value_set=pa.array(list(BEHAVIOR_TYPES))),
               f"one of {'|'.join(BEHAVIOR_TYPES)}")
        yield _Block(
            users=_ints(batch, "user_id"),
            items=_ints(batch, "item_id"),
            cats=_ints(batch, "category_id"),
            pv=pc.equal(btype, "pv").to_numpy(zero_copy_only=False),
            ts=_ints(batch, "timestamp"),
        )


# ------------------------------------------------------------------------------------ out-of-core sort


def _batch_rows(sort_rows: int) -> int:
    """Rows per record batch of a sorted run: the unit the merge holds per run."""
    return max(1, min(65_536, sort_rows // 4))


def _sort_runs(blocks: Iterable[B], sort_rows: int, folder: Path) -> list[Path]:
    """Sorts the rows of ``blocks`` in runs of ``sort_rows`` rows, each stably by (users, ts), into Arrow files.

    Returns:
        The run files, in input order (run ``r`` holds rows that come before those of run ``r + 1``).
    """
    folder.mkdir()
    runs: list[Path] = []
    pending: list = []
    pending_rows = 0
    options = pa.ipc.IpcWriteOptions(compression="lz4")

    def spill(b) -> None:
        order = np.lexsort((b.ts, b.users))  # stable: ties keep the input order
        table = pa.table({k: getattr(b, k)[order] for k in _fields(type(b))})
        run = folder / f"run-{len(runs):05d}.arrow"
        with pa.ipc.new_file(run, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=_batch_rows(sort_rows))
        runs.append(run)

    for b in blocks:
        pending.append(b)
        pending_rows += len(b.users)
        while pending_rows >= sort_rows:
            rows = _concat(pending)
            spill(_slice(rows, 0, sort_rows))
            rest = _slice(rows, sort_rows)
            pending, pending_rows = [rest], len(rest.users)
    if pending_rows:
        spill(_concat(pending))
    return runs


def _merged_blocks(runs: list[Path], block_type: type = _Block) -> Iterator:
    """The rows of the sorted runs in (users, ts, run, position in run) order, as ``block_type`` blocks: a
    k-way merge holding one record batch per run.

    Each step emits every buffered row whose key is at most the bound ``(user, timestamp, run)`` of the
    last buffered row of the run whose buffer ends lowest among runs with batches left: no row still
    unread can sort before it, and that run's buffer empties, so every step makes progress.
    """
    names = _fields(block_type)
    readers = [pa.ipc.open_file(pa.memory_map(str(r))) for r in runs]
    next_batch = [0] * len(readers)
    buffers: list = [None] * len(readers)

    def load(r: int) -> None:
        if next_batch[r] < readers[r].num_record_batches:
            rb = readers[r].get_batch(next_batch[r])
            next_batch[r] += 1
            buffers[r] = block_type(*(rb.column(k).to_numpy(zero_copy_only=False) for k in names))
        else:
            buffers[r] = None

    for r in range(len(readers)):
        load(r)
    while True:
        live = [r for r, b in enumerate(buffers) if b is not None]
        if not live:
            return
        more = [r for r in live if next_batch[r] < readers[r].num_record_batches]
        take: dict[int, int] = {}
        if more:
            bound_run = min(more, key=lambda r: (buffers[r].users[-1], buffers[r].ts[-1], r))
            bu, bt = buffers[bound_run].users[-1], buffers[bound_run].ts[-1]
            for r in live:
                b = buffers[r]
                keep = (b.users < bu) | ((b.users == bu) & ((b.ts < bt) | ((b.ts == bt) & (r <= bound_run))))
                take[r] = int(np.count_nonzero(keep))  # a prefix: the buffer is sorted
        else:
            take = {r: len(buffers[r].users) for r in live}
        out = _concat([_slice(buffers[r], 0, take[r]) for r in live])  # runs in order, each in order
        yield _take(out, np.lexsort((out.ts, out.users)))  # stable: ties keep (run, position)
        for r in live:
            rest = _slice(buffers[r], take[r])
            if len(rest.users):
                buffers[r] = rest
            else:
                load(r)
