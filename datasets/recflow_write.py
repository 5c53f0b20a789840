"""Writing the request-level output of :mod:`datasets.recflow`: one day's validated all_stage rows grouped into
requests (furthest stages first under the cap, then in a seeded random order), joined with their histories and
cross feature, and written as parquet row groups into rotating files (``_RequestWriter``, the converters'
``datasets.taobao_samples._SplitWriter``); the output's arrow schema, table sizes and :class:`SchemaConfig`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.recflow_read import (
    ID_FIELDS,
    SEQ_COLUMNS,
    SEQ_LEN,
    USER_COLUMNS,
    _histories,
    _load_pickle,
    _read_day,
)
from datasets.schema import DataError, FloatFeature, IdFeature, SchemaConfig
from datasets.taobao_samples import _SplitWriter

if TYPE_CHECKING:
    from datasets.recflow import RecFlowParams

__all__ = ["CROSS_LEVELS", "STAGE_NAMES", "recflow_arrow_schema", "recflow_schema"]

#: Stage priority -> its name in meta["counts"]["rows_by_stage"].
STAGE_NAMES = {5: "realshow (5)", 4: "rerank_pos or rank_pos (4)", 3: "rerank_neg or rank_neg (3)",
               2: "coarse_neg (2)", 1: "prerank_neg (1)", 0: "no stage flag (0, dropped)"}
#: cand_cross takes values 1..CROSS_LEVELS (table size CROSS_LEVELS + 1).
CROSS_LEVELS = 8
_MAX_CHUNK_CANDIDATES = 1 << 26  # list<> offsets are int32


def recflow_arrow_schema() -> pa.Schema:
    """The arrow schema of the converter's parquet files (see :mod:`datasets.recflow`)."""
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
