"""Reading side of the Taobao converter (:mod:`datasets.taobao`): the CSV read and validated block by block,
and the out-of-core sort of a file that is not in ``(user_id, timestamp)`` order.

The CSV is streamed with ``pyarrow.csv.open_csv``, ``block_size`` bytes at a time; every value is checked
(ids non-negative integers, timestamps integers, ``behavior_type`` in ``pv|buy|cart|fav``) and the first bad
one raises one :class:`DataError` naming the file, the line, the column and the expected value (a row with a
wrong field count is located by re-reading the file with :mod:`csv`, as pyarrow's message has no line
number). A missing, empty or unreadable file is a :class:`DataError` too.

Sorting: sorted runs of ``sort_rows`` rows (each stably by ``(user_id, timestamp)``), written as LZ4 Arrow
files into a folder the caller chooses (the converter's temporary output folder), then a k-way merge holding
one record batch per run, so memory is bounded by ``sort_rows``. Ties keep the file order.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datasets.canonical import BEHAVIOR_TYPES
from datasets.schema import DataError

if TYPE_CHECKING:
    from datasets.taobao import TaobaoParams

_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]

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
        return _Block(*(getattr(self, k)[start:stop] for k in _BLOCK_FIELDS))


_BLOCK_FIELDS = ("users", "items", "cats", "pv", "ts")


def _concat(blocks: list[_Block]) -> _Block:
    return _Block(*(np.concatenate([getattr(b, k) for b in blocks]) for k in _BLOCK_FIELDS))


def _locate_bad_line(path: str) -> tuple[int, int, str]:
    """(line number, field count, text) of the first line without 5 fields (error path only; streams)."""
    try:
        with open(path, newline="", errors="replace") as fh:
            for number, fields in enumerate(csv.reader(fh), start=1):
                if len(fields) != len(_COLUMNS):
                    return number, len(fields), ",".join(fields)[:200]
    except (OSError, csv.Error):
        pass
    return -1, -1, ""


def _input_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read at all (missing, a folder, unreadable, empty), or None."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return "is a folder; expected the UserBehavior CSV file"
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if st.st_size == 0:
        return f"empty file; expected rows {','.join(_COLUMNS)}"
    return None


def _blocks(path: str, block_size: int) -> Iterator[_Block]:
    """Streams the CSV block by block, validating every value.

    Raises:
        DataError: missing, empty or unreadable file, or the first malformed row (line, column, expected
            value).
    """
    problem = _input_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")

    def parse_error(e: pa.ArrowException, after: int) -> DataError:
        """The first line with a wrong field count (pyarrow's message has no line number), else ``e``."""
        number, count, text = _locate_bad_line(path) if "columns, got" in str(e) else (-1, -1, "")
        if number > after:
            return DataError(
                f"{path}: line {number}: {count} fields ({text!r}); expected {len(_COLUMNS)} columns "
                f"{','.join(_COLUMNS)}"
            )
        return DataError(f"{path}: cannot read as CSV from line {after + 1} on: {' '.join(str(e).split())}")

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=_COLUMNS, block_size=block_size),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in _COLUMNS}),
        )
    except pa.ArrowException as e:
        raise parse_error(e, 0) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    line = 1
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as e:
            raise parse_error(e, line - 1) from None

        def check(column: str, ok: pa.Array, expected: str) -> None:
            good = ok.to_numpy(zero_copy_only=False)
            if not good.all():
                i = int(np.argmin(good))
                value = batch.column(column)[i].as_py()
                raise DataError(f"{path}: line {line + i}, column {column!r}: value {value!r}; expected {expected}")

        for column in ("user_id", "item_id", "category_id"):
            check(column, pc.match_substring_regex(batch.column(column), r"^[0-9]{1,18}$"), "a non-negative integer id")
        check("timestamp", pc.match_substring_regex(batch.column("timestamp"), r"^-?[0-9]{1,18}$"), "an integer unix timestamp (seconds)")
        btype = batch.column("behavior_type")
        check("behavior_type", pc.is_in(btype, value_set=pa.array(list(BEHAVIOR_TYPES))), f"one of {'|'.join(BEHAVIOR_TYPES)}")

        def ints(column: str) -> np.ndarray:
            return pc.cast(batch.column(column), pa.int64()).to_numpy()

        yield _Block(
            users=ints("user_id"),
            items=ints("item_id"),
            cats=ints("category_id"),
            pv=pc.equal(btype, "pv").to_numpy(zero_copy_only=False),
            ts=ints("timestamp"),
        )
        line += batch.num_rows


# ------------------------------------------------------------------------------------ out-of-core sort


def _run_batch_rows(p: TaobaoParams) -> int:
    """Rows per record batch of a sorted run: the unit the merge holds per run."""
    return max(1, min(65_536, p.sort_rows // 4))


def _sort_runs(path: str, p: TaobaoParams, folder: Path) -> list[Path]:
    """Sorts the CSV in runs of ``sort_rows`` rows, each stably by (user, timestamp), into Arrow files.

    Returns:
        The run files, in file order (run ``r`` holds rows that come before those of run ``r + 1``).
    """
    folder.mkdir()
    runs: list[Path] = []
    pending: list[_Block] = []
    pending_rows = 0
    options = pa.ipc.IpcWriteOptions(compression="lz4")

    def spill(b: _Block) -> None:
        order = np.lexsort((b.ts, b.users))  # stable: ties keep the file order
        table = pa.table({k: getattr(b, k)[order] for k in _BLOCK_FIELDS})
        run = folder / f"run-{len(runs):05d}.arrow"
        with pa.ipc.new_file(run, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=_run_batch_rows(p))
        runs.append(run)

    for b in _blocks(path, p.block_size):
        pending.append(b)
        pending_rows += len(b.users)
        while pending_rows >= p.sort_rows:
            rows = _concat(pending)
            spill(rows.slice(0, p.sort_rows))
            rest = rows.slice(p.sort_rows)
            pending, pending_rows = [rest], len(rest.users)
    if pending_rows:
        spill(_concat(pending))
    return runs


def _merged_blocks(runs: list[Path]) -> Iterator[_Block]:
    """The rows of the sorted runs in (user, timestamp, run, position in run) order: a k-way merge holding
    one record batch per run.

    Each step emits every buffered row whose key is at most the bound ``(user, timestamp, run)`` of the
    last buffered row of the run whose buffer ends lowest among runs with batches left: no row still
    unread can sort before it, and that run's buffer empties, so every step makes progress.
    """
    readers = [pa.ipc.open_file(pa.memory_map(str(r))) for r in runs]
    next_batch = [0] * len(readers)
    buffers: list[Optional[_Block]] = [None] * len(readers)

    def load(r: int) -> None:
        if next_batch[r] < readers[r].num_record_batches:
            rb = readers[r].get_batch(next_batch[r])
            next_batch[r] += 1
            buffers[r] = _Block(*(rb.column(k).to_numpy(zero_copy_only=False) for k in _BLOCK_FIELDS))
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
        out = _concat([buffers[r].slice(0, take[r]) for r in live])  # runs in order, each in order
        order = np.lexsort((out.ts, out.users))  # stable: ties keep (run, position)
        yield _Block(*(getattr(out, k)[order] for k in _BLOCK_FIELDS))
        for r in live:
            rest = buffers[r].slice(take[r])
            if len(rest.users):
                buffers[r] = rest
            else:
                load(r)
