"""Tests of datasets.recflow on a small RecFlow folder written here in the published layout (DATA_SCHEMAS.md,
RecFlow's README): all_stage/ and realshow/ day files as feather (all 30 columns), seq_effective_50_dict/ and
request_id_dict/ pickles of dicts of int64 numpy arrays ([50, 10] left-padded histories, valid where column 7 > 0;
[n, 8] stage arrays), others/id_cnt.pkl. Every value is synthetic (made up here, not RecFlow data); the
expected rows are derived here in plain Python, and one request is checked by hand."""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from datasets.config import DataConfig
from datasets.meta import apply_table_sizes
from datasets.reader import eval_loader
from datasets.recflow import SPLITS, RecFlowParams, convert, main, recflow_schema
from datasets.schema import SchemaConfig

ROOT = Path(__file__).resolve().parents[2]
ALL_STAGE_COLUMNS = [
    "request_id", "request_timestamp", "user_id", "device_id", "age", "gender", "province", "video_id", "author_id",
    "category_level_one", "category_level_two", "upload_type", "upload_timestamp", "duration", "realshow",
    "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg", "rank_index", "rerank_index",
    "playing_time", "effective_view", "long_view", "like", "follow", "forward", "comment",
]
FLAGS = ["realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg"]
PRIORITY = {"realshow": 5, "rerank_pos": 4, "rank_pos": 4, "rerank_neg": 3, "rank_neg": 3, "coarse_neg": 2,
            "prerank_neg": 1}
ID_CNT = {"user_id": 9, "device_id": 9, "gender": 2, "age": 7, "province": 30, "photo_id": 60, "author_id": 20,
          "category_level_two": 8, "category_level_one": 4, "upload_type": 5}
USERS = {1: (2, 3, 1, 10), 2: (3, 1, 0, 4), 3: (5, 6, 0, 29), 4: (0, 0, 2, 0)}  # user: device, age, gender, province

# A candidate: (video, author, category_level_two, flags set, effective_view). A behaviour: (video, cate_two, ts).
# day -> requests (request_id, user, request ts in ms, history oldest first, candidates in file order)
DAYS = {
    "2024-02-15": [
        (101, 2, 1707955200000, [(5, 1, 17), (6, 2, 18)],
         [(30, 1, 1, ("realshow",), 1), (31, 2, 2, ("prerank_neg",), 0), (32, 3, 1, ("rank_neg",), 0)]),
        (100, 1, 1707955300000, [],
         [(33, 4, 4, ("realshow",), 0), (34, 4, 1, ("coarse_neg",), 0)]),
    ],
    "2024-02-16": [
        (200, 1, 1708041600000, [(40 + k % 10, 4, 100 + k) for k in range(50)],  # full: no padding
         [(35, 5, 4, ("realshow",), 1), (36, 5, 3, ("rerank_neg",), 0), (37, 6, 4, ("prerank_neg",), 0)]),
        (201, 3, 1708041700000, [],
         [(38, 7, 2, ("rank_pos",), 0)]),
        (202, 4, 1708041800000, [(1, 1, 5)],
         [(39, 7, 2, (), 0), (40, 7, 2, (), 1)]),  # no stage flag at all: no request row
    ],
    "2024-02-17": [
        (300, 2, 1708128000000, [(7, 3, 50), (8, 3, 60), (9, 1, 70)],  # written newest first: reordered
         [(41, 8, 3, ("realshow",), 1), (42, 8, 3, ("realshow",), 1), (43, 9, 6, ("coarse_neg",), 0),
          (44, 9, 1, ("rank_neg",), 1)]),
    ],
    "2024-02-18": [
        (901, 4, 1708214500000, [(2, 8, 9)],
         [(45, 10, 8, ("realshow",), 0), (46, 10, 8, ("prerank_neg",), 0)]),
        (900, 3, 1708214400000, [(10, 2, 1000), (0, 0, 1500), (11, 2, 2000), (13, 2, 2500), (12, 5, 3000)],
         [(20, 5, 2, ("realshow", "rerank_pos", "rank_pos"), 1), (21, 6, 5, ("realshow",), 0),
          (22, 7, 0, ("rank_neg",), 1), (23, 0, 3, ("prerank_neg",), 0), (24, 8, 2, ("coarse_neg",), 0),
          (25, 8, 2, (), 0), (60, 9, 7, ("rerank_pos",), 0)]),
    ],
}
REVERSED_HISTORY = {300}  # valid entries written newest first (not the published order)
P = RecFlowParams(row_group_size=2, rows_per_file=3)


def _row(rid: int, user: int, ts: int, cand: tuple, k: int) -> dict:
    video, author, cat, flags, ev = cand
    device, age, gender, province = USERS[user]
    row = {c: 0 for c in ALL_STAGE_COLUMNS}
    row.update(request_id=rid, request_timestamp=ts, user_id=user, device_id=device, age=age, gender=gender,
               province=province, video_id=video, author_id=author, category_level_one=cat % 3,
               category_level_two=cat, upload_type=1, upload_timestamp=ts // 1000 - 86400, duration=15000 + k,
               effective_view=ev, playing_time=9000 * ev, long_view=0)
    row.update({f: int(f in flags) for f in FLAGS})
    row["rank_index"] = k if flags and flags[0] in ("realshow", "rank_pos", "rank_neg") else 0
    return row


def _sequence(rid: int, hist: list[tuple]) -> np.ndarray:
    """[50, 10] int64, left-padded with zeros; columns video_id, author_id, cate_two, cate_one, upload_type,
    upload_timestamp, duration, request_timestamp, playing_time, request_id."""
    a = np.zeros((50, 10), dtype=np.int64)
    rows = hist[::-1] if rid in REVERSED_HISTORY else hist
    for j, (video, cat, ts) in enumerate(rows):
        a[50 - len(rows) + j] = [video, 3, cat, cat % 3, 1, 1700000000, 12000, ts, 6000, rid - 50]
    return a


def write_recflow(root: Path) -> Path:
    """Writes the fixture in RecFlow's layout under ``root``; returns ``root``."""
    for sub in ("all_stage", "realshow", "seq_effective_50_dict", "request_id_dict", "others"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for day, requests in DAYS.items():
        rows = []
        # the requests' rows interleaved, the first request of the list first: not grouped, not sorted
        queues = [[_row(rid, u, ts, c, k) for k, c in enumerate(cands)] for rid, u, ts, _, cands in requests]
        while any(queues):
            for q in queues:
                if q:
                    rows.append(q.pop(0))
        table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.int64()) for c in ALL_STAGE_COLUMNS]))
        feather.write_feather(table, root / "all_stage" / f"{day}.feather")
        shown = [r for r in rows if r["realshow"] == 1]
        feather.write_feather(pa.Table.from_pylist(shown, schema=table.schema), root / "realshow" / f"{day}.feather")
        seq = {rid: _sequence(rid, hist) for rid, _, _, hist, _ in requests}
        if day == "2024-02-18":
            seq[999] = _sequence(999, [(3, 3, 3)])  # a sequence without an all_stage request
        (root / "seq_effective_50_dict" / f"{day}.pkl").write_bytes(pickle.dumps(seq))
        stages = {}
        for rid, _, _, _, cands in requests:
            stages[rid] = {f: np.array([[v, a, 15000, c, 1, 1700000000, c % 3, ev] for v, a, c, fl, ev in cands
                                        if f in fl], dtype=np.int64).reshape(-1, 8) for f in FLAGS}
        (root / "request_id_dict" / f"{day}.pkl").write_bytes(pickle.dumps(stages))
    (root / "others" / "id_cnt.pkl").write_bytes(pickle.dumps(ID_CNT))
    return root


def expected() -> dict[str, list[dict]]:
    """Plain Python: one row per request with a flagged candidate; candidates as a sorted list of tuples
    (item, category, author, cross, stage, click, exposed)."""
    split_of = {"2024-02-15": "train", "2024-02-16": "train", "2024-02-17": "valid", "2024-02-18": "test"}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for day, requests in DAYS.items():
        for rid, user, _, hist, cands in sorted(requests):
            flagged = [c for c in cands if c[3]]
            if not flagged:
                continue
            device, age, gender, province = USERS[user]
            hist_cats = [cat for _, cat, _ in hist]
            out[split_of[day]].append({
                "request_id": rid, "user_id": user + 1, "user_age": age + 1, "user_gender": gender + 1,
                "user_province": province + 1, "device_id": device + 1,
                "hist_item_id": [v + 1 for v, _, _ in hist], "hist_category": [c + 1 for c in hist_cats],
                "candidates": sorted(
                    (v + 1, c + 1, a + 1, 1 + min(7, int(math.log2(1 + hist_cats.count(c)))),
                     float(max(PRIORITY[f] for f in fl)), float(ev * ("realshow" in fl)), float("realshow" in fl))
                    for v, a, c, fl, ev in flagged),
            })
    return out


CAND = ["cand_item_id", "cand_category", "cand_author_id", "cand_cross", "cand_stage", "cand_click", "cand_exposed"]


def read(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def normalized(rows: list[dict]) -> list[dict]:
    """Rows with the candidate columns zipped into a sorted ``candidates`` list (their order is random)."""
    out = []
    for r in rows:
        r = dict(r)
        r["candidates"] = sorted(zip(*(r.pop(c) for c in CAND)))
        out.append(r)
    return out


@pytest.fixture
def recflow(tmp_path: Path) -> Path:
    return write_recflow(tmp_path / "RecFlow")


def test_rows_equal_the_plain_python_reference(recflow: Path, tmp_path: Path) -> None:
    meta = convert(recflow, tmp_path / "out", P)
    want = expected()
    for split in SPLITS:
        assert normalized(read(tmp_path / "out", split)) == want[split], split
    ids = [r["request_id"] for s in SPLITS for r in read(tmp_path / "out", s)]
    assert ids == [100, 101, 200, 201, 300, 900, 901] and len(set(ids)) == len(ids)  # days in order, then id
    assert {s: meta["splits"][s]["rows"] for s in SPLITS} == {"train": 4, "valid": 1, "test": 2}
    assert {s: meta["splits"][s]["days"] for s in SPLITS} == {
        "train": ["2024-02-15", "2024-02-16"], "valid": ["2024-02-17"], "test": ["2024-02-18"]}


def test_hand_checked_request(recflow: Path, tmp_path: Path) -> None:
    convert(recflow, tmp_path / "out", P)
    r = [x for x in read(tmp_path / "out", "test") if x["request_id"] == 900][0]
    # user 3: device 5, age 6, gender 0, province 29 -> every id + 1
    assert [r[c] for c in ["user_id", "device_id", "user_age", "user_gender", "user_province"]] == [4, 6, 7, 1, 30]
    # left-padding (45 rows) removed; video 0 at ts 1500 is a real behaviour (valid: column 7 > 0); oldest first
    assert r["hist_item_id"] == [11, 1, 12, 14, 13] and r["hist_category"] == [3, 1, 3, 3, 6]
    got = {v: (c, a, x, s, k, e) for v, c, a, x, s, k, e in zip(*(r[c] for c in CAND))}
    assert got == {
        21: (3, 6, 3, 5.0, 1.0, 1.0),  # realshow + rerank_pos + rank_pos: stage 5; 3 behaviours of cat 2: 1 + 2
        22: (6, 7, 2, 5.0, 0.0, 1.0),  # exposed, not viewed; 1 behaviour of cat 5: 1 + 1
        23: (1, 8, 2, 3.0, 0.0, 0.0),  # rank_neg with effective_view 1: unexposed, so no click
        24: (4, 1, 1, 1.0, 0.0, 0.0),  # prerank_neg; no behaviour of cat 3
        25: (3, 9, 3, 2.0, 0.0, 0.0),  # coarse_neg
        61: (8, 10, 1, 4.0, 0.0, 0.0),  # rerank_pos; raw video id 60 = id_cnt photo_id is accepted
    }  # video 25 (no stage flag) is dropped
    full = [x for x in read(tmp_path / "out", "train") if x["request_id"] == 200][0]
    assert len(full["hist_item_id"]) == 50 and full["cand_cross"][full["cand_item_id"].index(36)] == 6  # 1 + 5
    assert full["hist_item_id"][:3] == [41, 42, 43]
    rev = read(tmp_path / "out", "valid")[0]
    assert rev["hist_item_id"] == [8, 9, 10] and rev["hist_category"] == [4, 4, 2]  # sorted by time, oldest first


def test_meta_counts_table_sizes_and_dropped(recflow: Path, tmp_path: Path) -> None:
    meta = convert(recflow, tmp_path / "out", P)
    assert meta["table_sizes"] == {
        "t_user_id": 11, "t_user_age": 9, "t_user_gender": 4, "t_user_province": 32, "t_device_id": 11,
        "t_item_id": 62, "t_item_category": 10, "t_cand_author_id": 22, "t_cand_cross": 9}
    c = meta["counts"]
    assert c["all_stage_rows"] == 24 and c["requests"] == 7 and c["candidates"] == 21
    assert c["rows_per_day"] == {"2024-02-15": 5, "2024-02-16": 6, "2024-02-17": 4, "2024-02-18": 9}
    assert c["exposed"] == 8 and c["clicks"] == 5  # 101/30, 200/35, 300/41, 300/42, 900/20
    assert c["rows_by_stage"] == {"realshow (5)": 8, "rerank_pos or rank_pos (4)": 2, "rerank_neg or rank_neg (3)": 4,
                                  "coarse_neg (2)": 3, "prerank_neg (1)": 4, "no stage flag (0, dropped)": 3}
    assert c["rows_with_several_stage_flags"] == 1 and c["effective_view_of_unexposed"] == 3  # 202/40, 300/44, 900/22
    assert c["requests_without_candidates"] == 1 and c["histories_reordered"] == 1
    assert c["sequences_unused"] == 2  # 202 (no candidate) and 999 (no all_stage request)
    assert c["max_raw_id"]["photo_id"] == 60 and c["max_raw_id"]["category_level_two"] == 8
    assert meta["dropped"] == {"rows with no stage flag": 3,
                               "candidates beyond max_candidates=500 (lowest stages first)": 0,
                               "rows of days between the valid day 2024-02-17 and the test day 2024-02-18": 0,
                               "rows of days after the test day 2024-02-18": 0}
    assert c["all_stage_rows"] == c["candidates"] + sum(meta["dropped"].values())
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert {s: meta["splits"][s]["files"] for s in SPLITS} == {"train": 2, "valid": 1, "test": 1}  # 3 rows a file
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in sorted((tmp_path / "out" / "train").iterdir())] == [2, 1]


def test_cap_keeps_the_furthest_stages(recflow: Path, tmp_path: Path) -> None:
    meta = convert(recflow, tmp_path / "out", replace(P, max_candidates=3))
    want = {r["request_id"]: r["candidates"] for s in SPLITS for r in expected()[s]}
    for s in SPLITS:
        for r in normalized(read(tmp_path / "out", s)):
            stages = sorted((c[4] for c in want[r["request_id"]]), reverse=True)[:3]
            assert sorted((c[4] for c in r["candidates"]), reverse=True) == stages, r["request_id"]
            assert set(r["candidates"]) <= set(want[r["request_id"]])
    r = normalized([x for x in read(tmp_path / "out", "test") if x["request_id"] == 900])[0]
    assert [c[0] for c in r["candidates"]] == [21, 22, 61]  # stages 5, 5, 4
    assert meta["dropped"]["candidates beyond max_candidates=3 (lowest stages first)"] == 4  # 900: 3, 300: 1
    assert meta["counts"]["candidates"] == 17


def test_candidate_order_is_seeded_and_not_by_stage(recflow: Path, tmp_path: Path) -> None:
    convert(recflow, tmp_path / "a", P)
    convert(recflow, tmp_path / "b", P)
    for s in SPLITS:
        assert read(tmp_path / "a", s) == read(tmp_path / "b", s)
    orders = set()
    for seed in range(6):
        convert(recflow, tmp_path / "c", replace(P, seed=seed))
        r = [x for x in read(tmp_path / "c", "test") if x["request_id"] == 900][0]
        orders.add(tuple(r["cand_item_id"]))
        assert normalized([r]) == normalized([x for x in read(tmp_path / "a", "test") if x["request_id"] == 900])
    assert len(orders) > 1


def test_days_outside_the_splits_are_counted(recflow: Path, tmp_path: Path) -> None:
    meta = convert(recflow, tmp_path / "out", replace(P, test_day="2024-02-17", valid_day="2024-02-15"))
    assert {s: meta["splits"][s]["rows"] for s in SPLITS} == {"train": 0, "valid": 2, "test": 1}
    assert meta["dropped"]["rows of days between the valid day 2024-02-15 and the test day 2024-02-17"] == 6
    assert meta["dropped"]["rows of days after the test day 2024-02-17"] == 9
    assert pq.read_table(tmp_path / "out" / "train").num_rows == 0  # an empty split still has a file


def _set_feather(path: Path, column: str, row: int, value: object) -> None:
    t = feather.read_table(path)
    v = t.column(column).to_pylist()
    v[row] = value
    i = t.column_names.index(column)
    feather.write_feather(t.set_column(i, column, pa.array(v, t.schema.field(column).type)), path)


def _rows(root: Path, day: str) -> list[dict]:
    return feather.read_table(root / "all_stage" / f"{day}.feather").to_pylist()


def _row_of(root: Path, day: str, rid: int, video: int) -> int:
    return next(i for i, r in enumerate(_rows(root, day)) if (r["request_id"], r["video_id"]) == (rid, video))


def _edit_pickle(path: Path, edit) -> None:
    d = pickle.loads(path.read_bytes())
    edit(d)
    path.write_bytes(pickle.dumps(d))


def _missing_column(root: Path) -> None:
    path = root / "all_stage" / "2024-02-16.feather"
    feather.write_feather(feather.read_table(path).drop_columns(["effective_view"]), path)


def _float_column(root: Path) -> None:
    path = root / "all_stage" / "2024-02-17.feather"
    t = feather.read_table(path)
    feather.write_feather(t.set_column(t.column_names.index("video_id"), "video_id",
                                       t.column("video_id").cast(pa.float64())), path)


def _with_null(root: Path) -> None:
    _set_feather(root / "all_stage" / "2024-02-15.feather", "author_id", 3, None)


def _big_video_id(root: Path) -> None:
    _set_feather(root / "all_stage" / "2024-02-15.feather", "video_id", _row_of(root, "2024-02-15", 100, 34), 61)


def _bad_flag(root: Path) -> None:
    _set_feather(root / "all_stage" / "2024-02-18.feather", "rank_neg", _row_of(root, "2024-02-18", 900, 22), 2)


def _two_ages(root: Path) -> None:
    _set_feather(root / "all_stage" / "2024-02-15.feather", "age", _row_of(root, "2024-02-15", 101, 32), 5)


def _request_twice(root: Path) -> None:
    path = root / "all_stage" / "2024-02-17.feather"
    t = feather.read_table(path)
    feather.write_feather(t.set_column(0, "request_id", pa.array([100] * t.num_rows, pa.int64())), path)
    _edit_pickle(root / "seq_effective_50_dict" / "2024-02-17.pkl", lambda d: d.update({100: d[300]}))


def _bad_shape(root: Path) -> None:
    _edit_pickle(root / "seq_effective_50_dict" / "2024-02-17.pkl", lambda d: d.update({300: d[300][:, :9]}))


def _missing_sequence(root: Path) -> None:
    _edit_pickle(root / "seq_effective_50_dict" / "2024-02-16.pkl", lambda d: d.pop(201))


def _big_category(root: Path) -> None:
    def edit(d: dict) -> None:
        d[900][46, 2] = 9
    _edit_pickle(root / "seq_effective_50_dict" / "2024-02-18.pkl", edit)


def _no_photo_id(root: Path) -> None:
    _edit_pickle(root / "others" / "id_cnt.pkl", lambda d: d.pop("photo_id"))


def _not_a_pickle(root: Path) -> None:
    (root / "seq_effective_50_dict" / "2024-02-15.pkl").write_bytes(b"not a pickle")


def _no_test_day(root: Path) -> None:
    (root / "all_stage" / "2024-02-18.feather").unlink()


@pytest.mark.parametrize("edit, match", [
    (_missing_column, r"all_stage/2024-02-16\.feather: no column 'effective_view'; expected RecFlow's all_stage "
                      r"columns"),
    (_float_column, r"all_stage/2024-02-17\.feather: column 'video_id' has type double; expected integers"),
    (_with_null, r"all_stage/2024-02-15\.feather: row 3, column 'author_id': value null; expected an integer"),
    (_big_video_id, r"all_stage/2024-02-15\.feather: row 3, column 'video_id': value 61; expected an id in 0\.\.60 "
                    r"\(others/id_cnt\.pkl: photo_id = 60\)"),
    (_bad_flag, r"all_stage/2024-02-18\.feather: row \d+, column 'rank_neg': value 2; expected 0 or 1"),
    (_two_ages, r"all_stage/2024-02-15\.feather: row 4, column 'age': value 5; expected 1 like the other rows of "
                r"request_id 101 \(one user per request\)"),
    (_request_twice, r"all_stage/2024-02-17\.feather: request_id 100 is also in .*all_stage/2024-02-15\.feather"),
    (_bad_shape, r"seq_effective_50_dict/2024-02-17\.pkl: request_id 300: int64 array of shape \(50, 9\); expected "
                 r"int64 arrays \[50, 10\] \(columns video_id, author_id, cate_two"),
    (_missing_sequence, r"seq_effective_50_dict/2024-02-16\.pkl: no entry for request_id 201"),
    (_big_category, r"seq_effective_50_dict/2024-02-18\.pkl: request_id 900, row 46, column 2 \(cate_two\): value 9; "
                    r"expected an id in 0\.\.8 \(others/id_cnt\.pkl: category_level_two = 8\)"),
    (_no_photo_id, r"others/id_cnt\.pkl: no field 'photo_id'"),
    (_not_a_pickle, r"seq_effective_50_dict/2024-02-15\.pkl: cannot read as a pickle"),
    (_no_test_day, r"all_stage/2024-02-18\.feather: no such file; the test day needs its all_stage file"),
])
def test_bad_input_keeps_the_previous_output(recflow: Path, tmp_path: Path, edit, match: str,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["--input", str(recflow), "--out", str(out), "--row-group-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["requests"] == 7
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    edit(recflow)
    assert main(["--input", str(recflow), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data error: ") and re.search(match, err), err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_arguments_and_foreign_output_folder(recflow: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--input", str(recflow), "--out", str(tmp_path / "o"), "--valid-day", "2024-02-18"])
    assert e.value.code == 2 and "valid_day 2024-02-18 must come before test_day" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--input", str(recflow), "--out", str(tmp_path / "o"), "--test-day", "18.02.2024"])
    assert e.value.code == 2
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["--input", str(recflow), "--out", str(foreign)]) == 2
    assert "output error" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"


def _yaml_schema() -> SchemaConfig:
    raw = OmegaConf.load(ROOT / "configs" / "datasets" / "recflow.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SchemaConfig), raw.data.schema))


def test_output_reads_through_the_reader_with_the_yaml_schema(recflow: Path, tmp_path: Path) -> None:
    meta = convert(recflow, tmp_path / "out", P)
    raw = OmegaConf.load(ROOT / "configs" / "datasets" / "recflow.yaml")
    assert raw.data.meta_path.endswith("/meta.json") and raw.data.schema.group_column == "request_id"
    schema = apply_table_sizes(_yaml_schema(), tmp_path / "out" / "meta.json")
    assert schema == recflow_schema(meta)
    cfg = DataConfig(schema=schema, eval_paths=[str(tmp_path / "out" / s / "*.parquet") for s in SPLITS],
                     batch_size=3)
    batches = list(eval_loader(cfg, 0, 1))
    rows = [r for s in SPLITS for r in read(tmp_path / "out", s)]
    valid = [b for b in batches if bool(b.valid.any())]
    assert sum(int(b.valid.sum()) for b in batches) == len(rows) == 7
    assert all(int(b.id_fixes.sum()) == 0 for b in batches) and all(b.labels.shape[1] == 0 for b in batches)
    got_ids = [int(g) for b in valid for g, ok in zip(b.group_ids, b.valid) if ok]
    assert got_ids == [r["request_id"] for r in rows]
    clicks, exposed, cross = [], [], []
    for b in valid:
        n = int(b.valid.sum())  # padding rows come last
        lengths = b.sequence_labels["cand_click"].lengths()[:n]
        clicks += b.sequence_labels["cand_click"].values()[: int(lengths.sum())].tolist()
        exposed += b.sequence_labels["cand_exposed"].values()[: int(lengths.sum())].tolist()
        cross += b.sparse_features["cand_cross"].values()[: int(lengths.sum())].tolist()
    assert clicks == [x for r in rows for x in r["cand_click"]]
    assert exposed == [x for r in rows for x in r["cand_exposed"]]
    assert cross == [x for r in rows for x in r["cand_cross"]]
