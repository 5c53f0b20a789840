"""Tests of datasets.kuairand on small logs written in the exact format of KuaiRand's published files (the
19-column header of log_*.csv, video_features_basic_*.csv with quoted comma-separated tag lists). All rows are
synthetic (made up here, not KuaiRand data); expected values are derived here in plain Python."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets.config import DataConfig
from datasets.kuairand import SPLITS, KuaiRandParams, convert, kuairand_schema, main, order_logs
from datasets.reader import eval_loader

LOG_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
              "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab")
VIDEO_HEADER = ("video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,"
                "server_height,music_id,music_type,tag")
P = KuaiRandParams(max_len=3, row_group_size=2, rows_per_file=5, valid_from=20220430, test_from=20220504)


def log_line(user: int, video: int, when: str, click: int, like: int = 0, rand: int = 0) -> str:
    """One log row; ``when`` = 'yyyymmdd HHMM SS.mmm' (UTC+8 wall time, like the published hourmin)."""
    day, hm, sec = when.split()
    t = datetime.strptime(f"{day} {hm} {sec}", "%Y%m%d %H%M %S.%f").replace(tzinfo=timezone.utc)
    ms = int(t.timestamp() * 1000) - 8 * 3_600_000
    return (f"{user},{video},{day},{hm},{ms},{click},{like},0,0,0,0,{click},{1200 * click},15000,0,0,0,{rand},"
            f"{1 if rand else 0}")


# synthetic logs, each file's rows deliberately not in time order
LOGS = {
    "log_standard_4_08_to_4_21_pure.csv": [
        log_line(7, 30, "20220412 1010 05.000", 1, 1), log_line(7, 31, "20220410 0900 00.000", 1),
        log_line(3, 30, "20220415 2000 00.000", 0), log_line(3, 32, "20220409 0800 00.000", 1),
        log_line(7, 33, "20220411 1200 00.000", 0)],
    "log_standard_4_22_to_5_08_pure.csv": [
        log_line(7, 34, "20220501 1000 00.000", 1), log_line(3, 31, "20220506 1000 00.000", 1, 1),
        log_line(7, 32, "20220505 1000 00.000", 0), log_line(3, 33, "20220423 1000 00.000", 0)],
    "log_random_4_22_to_5_08_pure.csv": [
        log_line(7, 35, "20220502 1000 00.000", 1, 0, 1), log_line(7, 36, "20220502 1000 00.000", 0, 0, 1),
        log_line(3, 34, "20220424 1100 00.000", 1, 1, 1)],
}
VIDEOS = [(30, '"5,12"'), (31, "9"), (32, '" 5 , 3"'), (33, ""), (34, "12"), (35, '"9,1,2"')]  # 36: no row


def write_inputs(folder: Path) -> tuple[list[Path], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in LOGS.items():
        (folder / name).write_text(LOG_HEADER + "\n" + "\n".join(lines) + "\n")
        paths.append(folder / name)
    videos = folder / "video_features_basic_pure.csv"
    videos.write_text(VIDEO_HEADER + "\n" + "".join(f"{v},1,NORMAL,20220101,1,public,15000,720,1280,0,0,{t}\n"
                                                    for v, t in VIDEOS))
    return paths, videos


def expected(p: KuaiRandParams = P) -> dict[str, list[dict]]:
    """Plain Python: files in published order, per user stable sort by time_ms, history = earlier clicks."""
    rows = [r for name in LOGS for r in csv.DictReader([LOG_HEADER, *LOGS[name]])]
    users = {u: k + 1 for k, u in enumerate(sorted({int(r["user_id"]) for r in rows}))}
    items = {i: k + 1 for k, i in enumerate(sorted({int(r["video_id"]) for r in rows}))}
    first_tag = {v: int(t.strip('"').split(",")[0]) for v, t in VIDEOS if t}
    cats = sorted({first_tag.get(i, -1) for i in items})
    cat = {i: cats.index(first_tag.get(i, -1)) + 1 for i in items}
    out = {s: [] for s in SPLITS}
    for u in sorted(users):
        seq = sorted([r for r in rows if int(r["user_id"]) == u], key=lambda r: int(r["time_ms"]))
        for r in seq:
            t = int(r["time_ms"])
            hist = [h for h in seq if int(h["time_ms"]) < t and h["is_click"] == "1"][-p.max_len:]
            d = int(r["date"])
            by_date = "train" if d < p.valid_from else "valid" if d < p.test_from else "test"
            split = "random" if r["is_rand"] == "1" else by_date
            out[split].append({
                "user_id": users[u], "item_id": items[int(r["video_id"])], "item_category": cat[int(r["video_id"])],
                "hist_item_id": [items[int(h["video_id"])] for h in hist],
                "hist_category": [cat[int(h["video_id"])] for h in hist],
                "hist_behavior_type": [3 if h["is_like"] == "1" else 1 for h in hist],
                "hist_time_delta": [(t - int(h["time_ms"])) / 1000 for h in hist],
                "label": float(r["is_click"]),
            })
    return out


def read(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def test_values_splits_and_categories(tmp_path: Path) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    meta = convert(paths[::-1], tmp_path / "out", P, videos)
    want = expected()
    for split in SPLITS:
        assert read(tmp_path / "out", split) == want[split], split
    assert {s: meta["splits"][s]["rows"] for s in SPLITS} == {"train": 6, "valid": 1, "test": 2, "random": 3}
    assert meta["counts"]["log_rows"] == 12 and meta["counts"]["clicks"] == 7 and meta["dropped"] == {}
    assert meta["counts"]["videos_without_tag"] == 2  # 33 (empty tag) and 36 (no row)
    assert meta["category_names"] == ["none", "tag 5", "tag 9", "tag 12"]
    assert meta["table_sizes"]["t_item_category"] == 5 and meta["table_sizes"]["t_item_id"] == 8
    # user 7's standard exposure of video 32 on 05-05 (test): history = its last 3 earlier clicks:
    # 30 (04-12, liked), 34 (05-01), 35 (05-02, a random exposure), label 0
    t = [r for r in read(tmp_path / "out", "test") if r["user_id"] == 2][0]
    assert (t["user_id"], t["item_id"], t["label"]) == (2, 3, 0.0)
    assert t["hist_item_id"] == [1, 5, 6] and t["hist_behavior_type"] == [3, 1, 1]
    assert t["hist_time_delta"] == [23 * 86400 - 605, 4 * 86400, 3 * 86400]


def test_file_order_is_the_published_order(tmp_path: Path) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    published = [str(tmp_path / "in" / n) for n in LOGS]
    assert order_logs([paths[2], paths[0], paths[1]]) == published
    assert order_logs([str(tmp_path / "in" / "log_*_pure.csv")]) == published  # glob: alphabetical is not it
    meta = convert([str(tmp_path / "in" / "log_*.csv")], tmp_path / "out", P)
    assert meta["inputs"] == published
    assert list(meta["counts"]["rows_per_file"].values()) == [5, 4, 3]
    # the two random rows at the same time keep their row order; neither is in the other's history
    r = [x for x in read(tmp_path / "out", "random") if x["user_id"] == 2]
    assert [x["item_id"] for x in r] == [6, 7] and r[0]["hist_item_id"] == r[1]["hist_item_id"] == [2, 1, 5]
    assert meta["category_names"] == ["none"]  # no --videos


def test_out_of_core_sort_matches(tmp_path: Path) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    small = replace(P, sort_rows=2, block_size=256, events_per_group=2)
    convert(paths, tmp_path / "a", small, videos)
    convert(paths, tmp_path / "b", replace(P, sort_rows=1 << 20), videos)
    for split in SPLITS:
        assert read(tmp_path / "a", split) == read(tmp_path / "b", split) == expected()[split]


@pytest.mark.parametrize("file, k, bad, match", [
    (1, 2, "7,34,20220501,1000,1651370400000,2,0,0,0,0,0,0,0,0,0,0,0,0,0",
     r"log_standard_4_22_to_5_08_pure\.csv: line 3, column 'is_click': value '2'; expected 0 or 1"),
    (0, 1, "7,30,20220412,1010,1649729405000,1,1,0,0",
     r"log_standard_4_08_to_4_21_pure\.csv: line 2: 9 fields .*expected 19 columns user_id,video_id"),
    (2, 3, "3,34,2022-04-24,1100,1650769200000,1,1,0,0,0,0,1,1200,15000,0,0,0,1,1",
     r"log_random_4_22_to_5_08_pure\.csv: line 4, column 'date': value '2022-04-24'; expected a date yyyymmdd"),
    (2, 0, "user_id,video_id,date,time_ms,is_click", r"log_random_4_22_to_5_08_pure\.csv: line 1: header lacks "
     r"column\(s\) is_like,is_rand"),
    (1, 0, LOGS["log_standard_4_22_to_5_08_pure.csv"][0], r"line 1: missing header"),
])
def test_bad_lines_keep_the_previous_output(tmp_path: Path, file: int, k: int, bad: str, match: str,
                                            capsys: pytest.CaptureFixture) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["--input", *map(str, paths), "--out", str(out), "--videos", str(videos), "--max-len", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["log_rows"] == 12
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    lines = paths[file].read_text().splitlines()
    lines[k] = bad
    paths[file].write_text("\n".join(lines) + "\n")
    assert main(["--input", *map(str, paths), "--out", str(out), "--videos", str(videos)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data error: ") and re.search(match, err), err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_video_tag_and_missing_glob(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    videos.write_text(videos.read_text().replace('"5,12"', '"5;12"'))
    assert main(["--input", *map(str, paths), "--out", str(tmp_path / "o"), "--videos", str(videos)]) == 3
    assert re.search(r"video_features_basic_pure\.csv: line 2, column 'tag': value '5;12'; expected a comma",
                     capsys.readouterr().err)
    assert main(["--input", str(tmp_path / "nope_*.csv"), "--out", str(tmp_path / "o")]) == 3
    assert "nope_*.csv: no file matches" in capsys.readouterr().err


def test_reader_reads_converted_data(tmp_path: Path) -> None:
    paths, videos = write_inputs(tmp_path / "in")
    meta = convert(paths, tmp_path / "out", P, videos)
    cfg = DataConfig(schema=kuairand_schema(meta), eval_paths=[str(tmp_path / "out" / s / "*.parquet") for s in SPLITS],
                     batch_size=4)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == 12
    assert all(int(b.id_fixes.sum()) == 0 for b in batches)
