"""Converter of RecFlow (Kuaishou, ICLR 2025) to request-level parquet for pre-ranking (DUET): one row per request,
the user's recent effective views as the history and every stage sample of the request as its candidates.

Input: the published folder (``--input RECFLOW_ROOT``)::

    all_stage/2024-MM-DD.feather      every stage sample of the day, one row per (request, video)
    seq_effective_50_dict/DATE.pkl    dict request_id -> int64 [50, 10]: the user's last 50 effective views
    others/id_cnt.pkl                 dict field -> cardinality (user_id, device_id, gender, age, province,
                                      photo_id, author_id, category_level_two, ...)

``realshow/`` (the exposed rows, already in ``all_stage`` with ``realshow`` = 1) and ``request_id_dict/`` (the
rows of ``all_stage`` again, per request and stage) are not read. The pickles are trusted input (unpickling can
run code). Days are the ``YYYY-MM-DD.feather`` files of ``all_stage/``, read in date order, one at a time: a day
is read (column by column), validated, sorted by request with pyarrow, written, and freed before the next
(memory: about 100 bytes per all_stage row of the day, some 5 GB for a full day of about 51M rows, then that
day's pickle).

One output row per request (columns, arrow types)::

    request_id      int64           RecFlow's request id, as published (unique over all splits; group column)
    user_id         int64           \\
    user_age        int64            |  the request's user (``age``, ``gender``, ``province``, ``device_id``
    user_gender     int64            |  of its all_stage rows, which must agree within the request)
    user_province   int64            |
    device_id       int64           /
    hist_item_id    list<int64>     group "history": the request's seq_effective_50_dict entry, padding
    hist_category   list<int64>     removed, oldest first (video_id and cate_two)
    cand_item_id    list<int64>     group "candidates": the request's all_stage rows (exposed and unexposed)
    cand_category   list<int64>       category_level_two
    cand_author_id  list<int64>
    cand_cross      list<int64>       1 + min(7, floor(log2(1 + h))), h = history behaviours of the candidate's
                                      category: 1..8 (1..6 with 50 behaviours), table size 9
    cand_stage      list<float32>     stage priority: realshow 5, rerank_pos = rank_pos 4, rerank_neg =
                                      rank_neg 3, coarse_neg 2, prerank_neg 1 (the highest flag set); not a
                                      model input: it reveals exposure (for stage-aware losses)
    cand_click      list<float32>     sequence label: effective_view of an exposed candidate, 0 if unexposed
    cand_exposed    list<float32>     sequence label: realshow

RecFlow logs no propensities, so there is no ``cand_propensity``; and no ``cand_true_click``: whether an
unexposed candidate would have been viewed is unknown in logged data.

Ids: 0 is padding, a RecFlow id ``x`` becomes ``x + 1``. ``id_cnt.pkl`` does not say whether its value ``n``
counts the ids ``0..n-1`` or is the largest id, so raw ids ``0..n`` are accepted and tables have ``n + 2`` rows:
the authors' tables (``RecFlow-ICLR/RecFlow`` DSSM/DIN: ``id_cnt[field] + 2`` rows, ids ``+ 1``, 0 = padding).
``meta["counts"]["max_raw_id"]`` gives the largest raw id seen per field. ``t_item_id`` (``photo_id``) and
``t_item_category`` (``category_level_two``) are shared by history and candidates; ``t_cand_author_id``
(``author_id``); ``t_cand_cross`` has 9 rows. An id outside ``0..n`` is bad input.

Category: ``category_level_two`` (the sequences' ``cate_two``): the finer of RecFlow's two levels, and the one
the authors embed like an id (level one is kept raw with its own padding value there). The cross feature
counts history behaviours of the same level-two category.

History: a sequence entry is valid where column 7 (``request_timestamp``) is > 0 (a ``video_id`` of 0 is a
real video); the valid entries are ordered by that timestamp, stably, oldest first. A published array is
left-padded and already in that order; ``meta["counts"]["histories_reordered"]`` counts those that were not.
Pickle entries that give no output row (a request without candidates, an id not in all_stage) are counted in
``meta["counts"]["sequences_unused"]``.

Candidates: a row's stage is the highest priority among its set flags; a row with no flag at all has no place
in the funnel and is dropped (``meta["dropped"]``). With ``--max-candidates K`` (0: no cap) a request keeps its
``K`` candidates of the furthest stages, ties broken at random; the others are dropped and counted. Within a
request the candidates come in a pseudo-random order (``numpy.random.default_rng([seed, yyyymmdd])`` per day),
so that the position tells neither stage nor exposure. An ``effective_view`` of 1 on an unexposed row becomes
a ``cand_click`` of 0 (``meta["counts"]["effective_view_of_unexposed"]``). A request whose rows all lack a stage
flag has no output row (``meta["counts"]["requests_without_candidates"]``).

Splits by day (RecFlow's protocol: test on 2024-02-18): ``train/`` the days before the valid day, ``valid/`` the
valid day (default: the day before the test day), ``test/`` the test day; the days after the test day, and
those between an earlier ``--valid-day`` and the test day, are in no split (their rows counted as dropped).
Requests keep the published order: days by date, then ``request_id``.

Bad input is one :class:`DataError` naming the file, the row (0-based index in the feather file) or request
id, the column, the value and what was expected: a missing file or column, a non-integer column, a null, a
flag or ``effective_view`` other than 0/1, an id outside its cardinality, user fields that differ within a
request, a request id in two days, a request with no sequence entry, a sequence entry that is not an integer
array ``[50, 10]``.

Output: ``OUT/{train,valid,test}/part-*.parquet`` and ``OUT/meta.json`` (``table_sizes`` for
``data.meta_path``, ``params``, ``counts``, ``splits``, ``dropped``); ``OUT`` is replaced atomically
(:func:`datasets.convert_io.staged_output`).

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or an ``--out`` that is not a previous output;
3 bad input, one line on stderr; 130 Ctrl-C)::

    python -m datasets.recflow --input RECFLOW_ROOT --out DIR [--test-day 2024-02-18] [--valid-day DAY]
        [--max-candidates 500] [--seed 0] [--row-group-size 4096] [--rows-per-file 65536]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from datasets.convert_io import run_converter, staged_output
from datasets.schema import DataError, FloatFeature, IdFeature, SchemaConfig
from datasets.taobao_samples import _SplitWriter

__all__ = ["RecFlowParams", "STAGE_PRIORITY", "convert", "main", "recflow_arrow_schema", "recflow_schema"]

SPLITS = ["train", "valid", "test"]
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in SPLITS}}
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
#: Stage priority -> its name in meta["counts"]["rows_by_stage"].
STAGE_NAMES = {5: "realshow (5)", 4: "rerank_pos or rank_pos (4)", 3: "rerank_neg or rank_neg (3)",
               2: "coarse_neg (2)", 1: "prerank_neg (1)", 0: "no stage flag (0, dropped)"}
CROSS_LEVELS = 8
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.feather$")
_MAX_CHUNK_CANDIDATES = 1 << 26  # list<> offsets are int32


def _day(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a date YYYY-MM-DD") from None


@dataclass
class RecFlowParams:
    """Protocol and layout parameters; see the module docstring.

    Attributes:
        test_day: the test split's day.
        valid_day: the valid split's day (None: the day before ``test_day``); train = the days before it.
        max_candidates: most candidates kept per request, furthest stages first (0: all).
        seed: seed of the order of candidates within a request (and of the ties the cap breaks).
        row_group_size: requests per parquet row group.
        rows_per_file: requests per parquet file.
    """

    test_day: str = "2024-02-18"
    valid_day: Optional[str] = None
    max_candidates: int = 500
    seed: int = 0
    row_group_size: int = 4096
    rows_per_file: int = 65536

    def days(self) -> tuple[dt.date, dt.date]:
        """``(valid day, test day)``."""
        test = _day(self.test_day, "test_day")
        valid = _day(self.valid_day, "valid_day") if self.valid_day is not None else test - dt.timedelta(days=1)
        return valid, test

    def check(self) -> None:
        valid, test = self.days()
        problems = []
        if not valid < test:
            problems.append(f"valid_day {valid} must come before test_day {test}")
        if self.max_candidates < 0:
            problems.append(f"max_candidates must be >= 0 (0 = all), got {self.max_candidates}")
        if self.row_group_size < 1 or self.rows_per_file < 1:
            problems.append(f"row_group_size and rows_per_file must be >= 1, got {self.row_group_size}, "
                            f"{self.rows_per_file}")
        if problems:
            raise ValueError("invalid RecFlowParams: " + "; ".join(problems))


def recflow_arrow_schema() -> pa.Schema:
    """The arrow schema of the converter's parquet files (see the module docstring)."""
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
    return pa.schema(
        [pa.field(c, pa.int64(), nullable=False) for c in ["request_id", *USER_COLUMNS]]
        + [pa.field(c, ints, nullable=False) for c in ["hist_item_id", "hist_category", "cand_item_id",
                                                       "cand_category", "cand_author_id", "cand_cross"]]
        + [pa.field(c, floats, nullable=False) for c in ["cand_stage", "cand_click", "cand_exposed"]]
    )


def _table_sizes(id_cnt: dict[str, int]) -> dict[str, int]:
    n = {field: id_cnt[field] + 2 for field in ID_FIELDS.values()}
    return {"t_user_id": n["user_id"], "t_user_age": n["age"], "t_user_gender": n["gender"],
            "t_user_province": n["province"], "t_device_id": n["device_id"], "t_item_id": n["photo_id"],
            "t_item_category": n["category_level_two"], "t_cand_author_id": n["author_id"],
            "t_cand_cross": CROSS_LEVELS + 1}


def recflow_schema(meta: dict) -> SchemaConfig:
    """The :class:`SchemaConfig` of a conversion, from its ``meta.json`` dict (``table_sizes``); the same as
    ``configs/datasets/recflow.yaml`` with that meta."""
    t = meta["table_sizes"]
    cand = {"sequence": True, "group": "candidates"}
    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id", t["t_user_id"]),
            IdFeature("user_age", t["t_user_age"]),
            IdFeature("user_gender", t["t_user_gender"]),
            IdFeature("user_province", t["t_user_province"]),
            IdFeature("device_id", t["t_device_id"]),
            IdFeature("hist_item_id", t["t_item_id"], sequence=True, table="item_id"),
            IdFeature("hist_category", t["t_item_category"], sequence=True, table="item_category"),
            IdFeature("cand_item_id", t["t_item_id"], table="item_id", **cand),
            IdFeature("cand_category", t["t_item_category"], table="item_category", **cand),
            IdFeature("cand_author_id", t["t_cand_author_id"], **cand),
            IdFeature("cand_cross", t["t_cand_cross"], **cand),
        ],
        float_features=[FloatFeature("cand_stage", **cand)],
        labels=[],
        sequence_labels=[FloatFeature("cand_click", **cand), FloatFeature("cand_exposed", **cand)],
        group_column="request_id",
    )
    schema.validate()
    return schema


# ------------------------------------------------------------------------------------------------ reading


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


def _cross(req_of_hist: np.ndarray, hist_cat: np.ndarray, req_of_cand: np.ndarray, cand_cat: np.ndarray,
           num_categories: int) -> np.ndarray:
    """``[C]`` 1 + min(7, floor(log2(1 + h))), h = behaviours of the candidate's request in its category."""
    width = num_categories + 2
    keys, counts = np.unique(req_of_hist * width + hist_cat, return_counts=True)
    want = req_of_cand * width + cand_cat
    at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
    h = np.where(keys[at] == want, counts[at], 0) if len(keys) else np.zeros(len(want), np.int64)
    exponent = np.frexp((1 + h).astype(np.float64))[1] - 1  # floor(log2(1 + h)), exact
    return 1 + np.minimum(CROSS_LEVELS - 1, exponent).astype(np.int64)


# ------------------------------------------------------------------------------------------------ writing


class _RequestWriter(_SplitWriter):
    """The converters' split writer (row groups into rotating files) for request tables, counting candidates,
    exposures, clicks and history behaviours, and the days written."""

    def __init__(self, out: Path, row_group_size: int, rows_per_file: int) -> None:
        super().__init__(out, row_group_size, rows_per_file, schema=recflow_arrow_schema())
        self.stats = {"rows": 0, "candidates": 0, "exposed": 0, "clicks": 0, "history_behaviours": 0}
        self.days: list[str] = []

    def _count(self, table: pa.Table) -> None:
        s = self.stats
        s["rows"] += table.num_rows
        s["candidates"] += len(pc.list_flatten(table.column("cand_item_id")))
        s["exposed"] += int(pc.sum(pc.list_flatten(table.column("cand_exposed"))).as_py() or 0)
        s["clicks"] += int(pc.sum(pc.list_flatten(table.column("cand_click"))).as_py() or 0)
        s["history_behaviours"] += len(pc.list_flatten(table.column("hist_item_id")))

    def _summary(self) -> dict:
        return {**self.stats, "files": self.files, "days": self.days}


def _list(offsets: np.ndarray, values: np.ndarray, t: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.astype(t.to_pandas_dtype())))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _sort(keys: dict[str, np.ndarray], order: list[tuple[str, str]]) -> np.ndarray:
    """Stable sort indices of the rows of ``keys`` (pyarrow, multi-threaded)."""
    return pc.sort_indices(pa.table(keys), sort_keys=order).to_numpy()


def _convert_day(path: Path, day: dt.date, seq_path: Path, id_cnt: dict[str, int], p: RecFlowParams,
                 writer: _RequestWriter, counts: dict, dropped: dict, seen: list[tuple[Path, np.ndarray]]) -> None:
    """Converts one day: all_stage rows -> request rows appended to ``writer``; updates counts and dropped."""
    d = _read_day(path, id_cnt, counts["max_raw_id"])
    n = len(d.request_id)
    counts["all_stage_rows"] += n
    counts["rows_per_day"][day.isoformat()] = n
    counts["rows_with_several_stage_flags"] += d.several_flags
    for priority, name in STAGE_NAMES.items():
        counts["rows_by_stage"][name] += int(np.count_nonzero(d.stage == priority))
    counts["effective_view_of_unexposed"] += int(np.count_nonzero((d.effective_view == 1) & (d.realshow == 0)))
    rand = np.random.default_rng([p.seed, day.year * 10000 + day.month * 100 + day.day]).random(n)
    # 1) by request, furthest stage first, ties at random: the cap keeps a prefix of every request
    idx = _sort({"r": d.request_id, "s": d.stage, "k": rand},
                [("r", "ascending"), ("s", "descending"), ("k", "ascending")])
    rid = d.request_id[idx]
    new = np.ones(n, dtype=bool)
    new[1:] = rid[1:] != rid[:-1]
    starts = np.flatnonzero(new)  # [Q] first sorted row of each request
    group = np.cumsum(new) - 1  # [n] request index of each sorted row
    for col in USER_COLUMNS.values():
        v = d.users[col][idx]
        bad = v != v[starts][group]
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{path}: row {idx[i]}, column {col!r}: value {v[i]}; expected {v[starts[group[i]]]} "
                            f"like the other rows of request_id {rid[i]} (one user per request)")
    day_rids = rid[starts]
    for earlier in seen:
        dup = np.isin(day_rids, earlier[1])
        if dup.any():
            raise DataError(f"{path}: request_id {day_rids[np.argmax(dup)]} is also in {earlier[0]}; expected "
                            f"every request in one day file")
    seen.append((path, day_rids))
    stage = d.stage[idx]
    pos = np.arange(n) - starts[group]
    flagged = stage > 0
    keep = flagged & ((p.max_candidates == 0) | (pos < p.max_candidates))
    dropped["rows with no stage flag"] += int(n - np.count_nonzero(flagged))
    dropped[f"candidates beyond max_candidates={p.max_candidates} (lowest stages first)"] += int(
        np.count_nonzero(flagged & ~keep))
    # 2) the kept rows by request, in random order
    kept = idx[keep]
    del idx, rid, stage, pos, flagged, group
    final = kept[_sort({"r": d.request_id[kept], "k": rand[kept]}, [("r", "ascending"), ("k", "ascending")])]
    del kept, rand
    rid = d.request_id[final]
    new = np.ones(len(final), dtype=bool)
    new[1:] = rid[1:] != rid[:-1]
    starts = np.flatnonzero(new)
    reqs = rid[starts]  # [Q'] requests with candidates, ascending
    lengths = np.diff(np.append(starts, len(final)))
    counts["requests_without_candidates"] += len(day_rids) - len(reqs)
    first = final[starts]
    users = {out_col: d.users[col][first] + 1 for out_col, col in USER_COLUMNS.items()}
    exposed = d.realshow[final]
    cand = {
        "cand_item_id": d.video_id[final] + 1,
        "cand_category": d.category[final] + 1,
        "cand_author_id": d.author_id[final] + 1,
        "cand_stage": d.stage[final].astype(np.float32),
        "cand_click": (d.effective_view[final] * exposed).astype(np.float32),
        "cand_exposed": exposed.astype(np.float32),
    }
    del d, final, rid
    seq = _load_pickle(seq_path, f"a pickled dict request_id -> int64 array [{SEQ_LEN}, {len(SEQ_COLUMNS)}]")
    if not isinstance(seq, dict):
        raise DataError(f"{seq_path}: holds a {type(seq).__name__}; expected a dict request_id -> int64 array "
                        f"[{SEQ_LEN}, {len(SEQ_COLUMNS)}]")
    counts["sequences_unused"] += len(seq) - len(reqs)  # entries of no output row
    cand_offsets = _offsets(lengths)
    a = 0
    while a < len(reqs):  # chunks of at most row_group_size requests and _MAX_CHUNK_CANDIDATES candidates
        limit = np.searchsorted(cand_offsets, cand_offsets[a] + _MAX_CHUNK_CANDIDATES, side="right") - 1
        b = int(min(a + p.row_group_size, len(reqs), max(limit, a + 1)))
        h_len, h_item, h_cat, reordered = _histories(seq, seq_path, reqs[a:b], id_cnt, counts["max_raw_id"])
        counts["histories_reordered"] += reordered
        c0, c1 = int(cand_offsets[a]), int(cand_offsets[b])
        c_len = lengths[a:b]
        cross = _cross(np.repeat(np.arange(b - a), h_len), h_cat, np.repeat(np.arange(b - a), c_len),
                       cand["cand_category"][c0:c1] - 1, id_cnt["category_level_two"])
        h_off, c_off = _offsets(h_len), _offsets(c_len)
        columns = [pa.array(reqs[a:b], pa.int64())] + [pa.array(users[c][a:b], pa.int64()) for c in USER_COLUMNS]
        columns += [_list(h_off, h_item + 1, pa.int64()), _list(h_off, h_cat + 1, pa.int64())]
        columns += [_list(c_off, cand[c][c0:c1], pa.int64()) for c in ["cand_item_id", "cand_category",
                                                                         "cand_author_id"]]
        columns += [_list(c_off, cross, pa.int64())]
        columns += [_list(c_off, cand[c][c0:c1], pa.float32()) for c in ["cand_stage", "cand_click",
                                                                           "cand_exposed"]]
        writer.add(pa.Table.from_arrays(columns, schema=writer.schema))
        a = b
    writer.days.append(day.isoformat())


def convert(root: str | Path, out_dir: str | Path, params: Optional[RecFlowParams] = None) -> dict:
    """Converts a RecFlow folder to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    Args:
        root: the published RecFlow folder (``all_stage/``, ``seq_effective_50_dict/``, ``others/id_cnt.pkl``).
        out_dir: output folder: new, empty, or a previous conversion (replaced as a whole once complete).
        params: protocol parameters.

    Returns:
        The meta written to ``meta.json``: ``source``, ``inputs`` (the day files read, in order), ``params``,
        ``id_cnt``, ``table_sizes``, ``counts``, ``dropped`` (rows by reason), ``splits``.

    Raises:
        DataError: bad input (see the module docstring); the test or valid day has no file.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params``.
    """
    p = params or RecFlowParams()
    p.check()
    valid_day, test_day = p.days()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected the RecFlow folder (all_stage/, seq_effective_50_dict/, "
                        f"others/id_cnt.pkl)")
    id_cnt = read_id_cnt(root / "others" / "id_cnt.pkl")
    days = _day_files(root)
    for want, what in ((valid_day, "valid"), (test_day, "test")):
        if want not in [d for d, _ in days]:
            raise DataError(f"{root / 'all_stage' / (want.isoformat() + '.feather')}: no such file; the {what} day "
                            f"needs its all_stage file (days found: {days[0][0]}..{days[-1][0]})")
    used = [(d, f) for d, f in days if d <= valid_day or d == test_day]
    for d, _ in used:
        s = root / "seq_effective_50_dict" / f"{d.isoformat()}.pkl"
        if not s.is_file():
            raise DataError(f"{s}: no such file; expected the day's seq_effective_50_dict pickle")
    counts: dict = {
        "all_stage_rows": 0, "rows_per_day": {}, "rows_by_stage": {name: 0 for name in STAGE_NAMES.values()},
        "rows_with_several_stage_flags": 0, "effective_view_of_unexposed": 0, "requests_without_candidates": 0,
        "histories_reordered": 0, "sequences_unused": 0, "max_raw_id": {},
    }
    between = f"rows of days between the valid day {valid_day} and the test day {test_day}"
    after = f"rows of days after the test day {test_day}"
    dropped = {"rows with no stage flag": 0,
               f"candidates beyond max_candidates={p.max_candidates} (lowest stages first)": 0, between: 0, after: 0}
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        writers = {s: _RequestWriter(tmp / s, p.row_group_size, p.rows_per_file) for s in SPLITS}
        seen: list[tuple[Path, np.ndarray]] = []
        for d, f in days:
            split = "train" if d < valid_day else "valid" if d == valid_day else "test" if d == test_day else None
            if split is not None:
                _convert_day(f, d, root / "seq_effective_50_dict" / f"{d.isoformat()}.pkl", id_cnt, p,
                             writers[split], counts, dropped, seen)
            else:  # not in a split: only counted
                n = _count_rows(f)
                dropped[after if d > test_day else between] += n
                counts["all_stage_rows"] += n
                counts["rows_per_day"][d.isoformat()] = n
        splits = {s: w.close() for s, w in writers.items()}
        candidates = sum(s["candidates"] for s in splits.values())
        counts.update(requests=sum(s["rows"] for s in splits.values()), candidates=candidates,
                      exposed=sum(s["exposed"] for s in splits.values()),
                      clicks=sum(s["clicks"] for s in splits.values()))
        meta = {
            "source": str(root),
            "protocol": "one row per request: history = seq_effective_50_dict (unpadded, oldest first), candidates "
                        "= every all_stage row of the request with a stage flag (capped at max_candidates, furthest "
                        "stages first, in random order); cand_click = effective_view of exposed candidates; splits "
                        "by day",
            "inputs": [str(f) for _, f in used],
            "params": asdict(p),
            "id_cnt": id_cnt,
            "id_mapping": "raw id x -> x + 1 (0 = padding); raw ids 0..id_cnt[field], tables id_cnt[field] + 2",
            "table_sizes": _table_sizes(id_cnt),
            "counts": counts,
            "dropped": dropped,
            "splits": splits,
        }
        assert counts["all_stage_rows"] == candidates + sum(dropped.values()), "every row is kept or dropped"
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = RecFlowParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.recflow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="the RecFlow folder (all_stage/, seq_effective_50_dict/, others/)")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--test-day", default=d.test_day, help="YYYY-MM-DD: the test split's day")
    ap.add_argument("--valid-day", default=None, help="YYYY-MM-DD: the valid split's day (default: the day before "
                                                      "the test day)")
    ap.add_argument("--max-candidates", type=int, default=d.max_candidates,
                    help="candidates kept per request, furthest stages first (0: all)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the candidates' order within a request")
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size, help="requests per row group")
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="requests per parquet file")
    a = ap.parse_args(argv)
    params = RecFlowParams(test_day=a.test_day, valid_day=a.valid_day, max_candidates=a.max_candidates, seed=a.seed,
                           row_group_size=a.row_group_size, rows_per_file=a.rows_per_file)
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "counts": {k: v for k, v in meta["counts"].items() if k != "rows_per_day"},
                      "dropped": meta["dropped"], "splits": meta["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
