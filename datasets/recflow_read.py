"""Reading and validating RecFlow's published layout for :mod:`datasets.recflow`.

The column names of ``all_stage/`` and ``seq_effective_50_dict/`` and what is read of them; ``others/id_cnt.pkl``
(:func:`read_id_cnt`); the day files of ``all_stage/``; one day's all_stage rows read column by column and
validated (``_read_day`` -> ``_Day``); the histories of a day's requests from its pickle (``_histories``). Bad input
raises one :class:`~datasets.schema.DataError` naming the file, the row or request id, the column, the value and
what was expected (the list is in the module docstring of :mod:`datasets.recflow`).
"""

from __future__ import annotations

import datetime as dt
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from datasets.schema import DataError

__all__ = ["ID_FIELDS", "SEQ_COLUMNS", "SEQ_LEN", "STAGE_PRIORITY", "USER_COLUMNS", "read_id_cnt"]

#: Stage flags of all_stage and their priority (DATA_SCHEMAS, the authors' learning-to-rank priority).
STAGE_PRIORITY = {"realshow": 5, "rerank_pos": 4, "rank_pos": 4, "rerank_neg": 3, "rank_neg": 3, "coarse_neg": 2,
                  "prerank_neg": 1}
#: all_stage id column -> its id_cnt.pkl field.
ID_FIELDS = {"user_id": "user_id", "device_id": "device_id", "age": "age", "gender": "gender",
             "province": "province", "video_id": "photo_id", "author_id": "author_id",
             "category_level_two": "category_level_two"}
#: output user column -> all_stage column.
USER_COLUMNS = {"user_id": "user_id", "user_age": "age", "user_gender": "gender", "user_province": "province",
                "device_id": "device_id"}
COLUMNS = ["request_id", *ID_FIELDS, *STAGE_PRIORITY, "effective_view"]
#: Columns of a seq_effective_50_dict array.
SEQ_COLUMNS = ["video_id", "author_id", "cate_two", "cate_one", "upload_type", "upload_timestamp", "duration",
               "request_timestamp", "playing_time", "request_id"]
SEQ_LEN = 50
_SEQ_CHECKS = {0: "photo_id", 2: "category_level_two"}  # sequence column -> id_cnt field, for the columns kept
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.feather$")


def _load_pickle(path: Path, what: str) -> object:
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected {what}")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError,
            OSError) as e:
        raise DataError(f"{path}: cannot read as a pickle ({type(e).__name__}: {e}); expected {what}") from None


def read_id_cnt(path: Path) -> dict[str, int]:
    """The cardinalities of ``others/id_cnt.pkl`` that the converter uses.

    Raises:
        DataError: unreadable file, not a dict, a field missing, a value that is not a positive integer.
    """
    what = "a pickled dict field -> cardinality"
    d = _load_pickle(path, what)
    if not isinstance(d, dict):
        raise DataError(f"{path}: holds a {type(d).__name__}; expected {what}")
    out = {}
    for field in ID_FIELDS.values():
        if field not in d:
            raise DataError(f"{path}: no field {field!r}; expected {what} with {', '.join(ID_FIELDS.values())}")
        v = d[field]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 < v < 2**62:
            raise DataError(f"{path}: field {field!r}: value {v!r}; expected a positive integer cardinality")
        out[field] = int(v)
    return out


def _day_files(root: Path) -> list[tuple[dt.date, Path]]:
    folder = root / "all_stage"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected RecFlow's all_stage/YYYY-MM-DD.feather files")
    days = []
    for f in sorted(folder.iterdir()):
        if f.suffix != ".feather":
            continue
        m = _DAY_FILE.match(f.name)
        try:
            days.append((dt.date.fromisoformat(m.group(1)), f))
        except (AttributeError, ValueError):
            raise DataError(f"{f}: not a day file; expected all_stage/YYYY-MM-DD.feather") from None
    if not days:
        raise DataError(f"{folder}: no .feather file; expected RecFlow's all_stage/YYYY-MM-DD.feather files")
    return sorted(days)


def _first_bad(path: Path, column: str, values: np.ndarray, bad: np.ndarray, expected: str) -> None:
    """Raises DataError at the first true entry of ``bad`` (entry = row of the file)."""
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: row {i}, column {column!r}: value {values[i].item()!r}; expected {expected}")


@dataclass
class _Day:
    """A day's all_stage rows, validated. Shapes: R rows."""

    request_id: np.ndarray  # [R] int64
    users: dict[str, np.ndarray]  # all_stage user column -> [R] int64 raw ids
    video_id: np.ndarray  # [R] int64 raw
    author_id: np.ndarray  # [R]
    category: np.ndarray  # [R] category_level_two, raw
    stage: np.ndarray  # [R] int8 priority, 0 = no flag
    several_flags: int  # rows with more than one flag
    realshow: np.ndarray  # [R] int8
    effective_view: np.ndarray  # [R] int8


def _read_day(path: Path, id_cnt: dict[str, int], max_raw: dict[str, int]) -> _Day:
    """Reads and validates the columns the converter uses of one all_stage file."""
    missing = [c for c in COLUMNS if c not in _feather_columns(path)]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; expected RecFlow's all_stage columns "
                        f"({', '.join(COLUMNS)}, ...)")
    cols: dict[str, np.ndarray] = {}
    for c in COLUMNS:  # one column at a time: the peak is the arrays kept plus one int64 column
        try:
            a = feather.read_table(path, columns=[c], memory_map=False).column(0)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read as a feather file ({' '.join(str(e).split())})") from None
        binary = c in STAGE_PRIORITY or c == "effective_view"
        if not (pa.types.is_integer(a.type) or (binary and pa.types.is_boolean(a.type))):
            raise DataError(f"{path}: column {c!r} has type {a.type}; expected integers")
        if a.null_count:
            row = int(np.argmax(a.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{path}: row {row}, column {c!r}: value null; expected an integer")
        v = a.combine_chunks().to_numpy(zero_copy_only=False) if a.num_chunks != 1 else a.chunk(0).to_numpy(
            zero_copy_only=False)
        if binary:
            v = v.astype(np.int64, copy=False)
            _first_bad(path, c, v, (v != 0) & (v != 1), "0 or 1")
            v = v.astype(np.int8)
        else:
            v = v.astype(np.int64, copy=False)
            if c in ID_FIELDS:
                n = id_cnt[ID_FIELDS[c]]
                _first_bad(path, c, v, (v < 0) | (v > n),
                           f"an id in 0..{n} (others/id_cnt.pkl: {ID_FIELDS[c]} = {n})")
                if len(v):
                    max_raw[ID_FIELDS[c]] = max(max_raw.get(ID_FIELDS[c], -1), int(v.max()))
        cols[c] = v
    stage = np.zeros(len(cols["request_id"]), dtype=np.int8)
    flags = np.zeros(len(stage), dtype=np.int8)
    for name, priority in STAGE_PRIORITY.items():
        f = cols.pop(name)
        stage = np.maximum(stage, f * np.int8(priority))
        flags += f
        if name == "realshow":
            realshow = f
    return _Day(
        request_id=cols["request_id"],
        users={c: cols[c] for c in USER_COLUMNS.values()},
        video_id=cols["video_id"],
        author_id=cols["author_id"],
        category=cols["category_level_two"],
        stage=stage,
        several_flags=int(np.count_nonzero(flags > 1)),
        realshow=realshow,
        effective_view=cols["effective_view"],
    )


def _feather_columns(path: Path) -> list[str]:
    """Column names of a feather file (V1 or V2) without reading its data."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a RecFlow all_stage day file")
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).schema.names
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    except pa.ArrowInvalid:  # Feather V1 (not RecFlow's V2) is no IPC file: read it whole
        try:
            return feather.read_table(path, memory_map=False).column_names
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read as a feather file ({' '.join(str(e).split())})") from None


def _count_rows(path: Path) -> int:
    try:
        return feather.read_table(path, columns=["request_id"], memory_map=False).num_rows
    except (pa.ArrowException, OSError, KeyError) as e:
        raise DataError(f"{path}: cannot read as a feather file ({' '.join(str(e).split())})") from None


def _histories(seq: object, path: Path, rids: np.ndarray, id_cnt: dict[str, int], max_raw: dict[str, int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The histories of ``rids`` from a seq_effective_50_dict pickle. Shapes: R requests, E behaviours.

    Returns:
        ``(lengths [R], video ids [E] raw, categories [E] raw, requests whose valid entries were not left of the
        padding or not in time order)``; each history oldest first.
    """
    what = f"int64 arrays [{SEQ_LEN}, {len(SEQ_COLUMNS)}] (columns {', '.join(SEQ_COLUMNS)})"
    arrays = []
    for r in rids.tolist():
        a = seq.get(r)
        if a is None:
            raise DataError(f"{path}: no entry for request_id {r} (a request of all_stage); expected a dict "
                            f"request_id -> {what}")
        if not isinstance(a, np.ndarray) or a.shape != (SEQ_LEN, len(SEQ_COLUMNS)) or a.dtype.kind not in "iu":
            got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise DataError(f"{path}: request_id {r}: {got}; expected {what}")
        arrays.append(a)
    if not arrays:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    a = np.stack(arrays).astype(np.int64, copy=False)  # [R, 50, 10]
    ts = a[:, :, 7]
    valid = ts > 0  # [R, 50]
    for col, field in _SEQ_CHECKS.items():
        n, v = id_cnt[field], a[:, :, col]
        bad = valid & ((v < 0) | (v > n))
        if bad.any():
            i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise DataError(f"{path}: request_id {rids[i]}, row {j}, column {col} ({SEQ_COLUMNS[col]}): value "
                            f"{v[i, j]}; expected an id in 0..{n} (others/id_cnt.pkl: {field} = {n})")
        if valid.any():
            max_raw[field] = max(max_raw.get(field, -1), int(v[valid].max()))
    order = np.argsort(np.where(valid, ts, -1), axis=1, kind="stable")  # [R, 50]: padding, then oldest first
    reordered = int(np.count_nonzero((order != np.arange(SEQ_LEN)).any(axis=1)))
    keep = np.take_along_axis(valid, order, axis=1)
    items = np.take_along_axis(a[:, :, 0], order, axis=1)[keep]
    cats = np.take_along_axis(a[:, :, 2], order, axis=1)[keep]
    return valid.sum(axis=1), items, cats, reordered
