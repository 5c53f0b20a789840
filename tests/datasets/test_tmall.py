"""Tests of datasets.tmall on synthetic logs written in the exact format of Tmall IJCAI-15's
``user_log_format1.csv`` (header line, MMDD time stamps without leading zeros, empty brand ids, rows not in
time order). All rows are synthetic (generated here); expected values are derived here in plain Python."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets.config import DataConfig
from datasets.reader import eval_loader
from datasets.schema import DataError
from datasets.taobao import TaobaoParams
from datasets.tmall import convert, main, tmall_schema

HEADER = "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type"
P = TaobaoParams(min_pv=40, max_len=30, negatives=2, seed=5, train_targets=5, train_stride=3, row_group_size=97,
                 rows_per_file=300, users_per_group=7, block_size=2048, sort_rows=150)
OFFSETS = {"train": [3 + 3 * k for k in range(5)], "valid": [2], "test": [1]}


def synthetic_rows(seed: int, users: int = 30) -> list[tuple]:
    """(user, item, cat, seller, brand, MMDD, action) in random order: many clicks per day (ties), some
    users below min_pv, non-click actions, empty brands."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in rng.choice(np.arange(1, 500_000), users, replace=False).tolist():
        n = int(rng.integers(25, 90))
        items = (rng.zipf(1.3, n) % 300 + 1).tolist()
        days = sorted(rng.choice([511, 520, 601, 618, 701, 829, 930, 1011, 1110, 1111], n).tolist())
        acts = rng.choice(["0", "0", "0", "0", "1", "2", "3"], n).tolist()
        for i, d, a in zip(items, days, acts):
            brand = "" if rng.random() < 0.1 else str(int(rng.integers(1, 9000)))
            rows.append((u, i, i % 17 + 1, int(rng.integers(1, 5000)), brand, d, a))
    return [rows[k] for k in rng.permutation(len(rows))]


def write_log(path: Path, rows: list[tuple]) -> Path:
    path.write_text(HEADER + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def secs(mmdd: int) -> int:
    return int((date(2015, mmdd // 100, mmdd % 100) - date(1970, 1, 1)).total_seconds())


class Expected:
    """The Taobao protocol on Tmall clicks, in plain Python from the CSV text."""

    def __init__(self, path: Path, p: TaobaoParams) -> None:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.rows = rows
        clicks = [(int(r["user_id"]), int(r["item_id"]), int(r["cat_id"]), int(r["time_stamp"]))
                  for r in rows if r["action_type"] == "0"]
        self.user_map = {u: k + 1 for k, u in enumerate(sorted({c[0] for c in clicks}))}
        self.item_map = {i: k + 1 for k, i in enumerate(sorted({c[1] for c in clicks}))}
        self.cat_map = {c: k + 1 for k, c in enumerate(sorted({c[2] for c in clicks}))}
        ev = defaultdict(list)
        for u, i, c, t in clicks:  # file order
            ev[self.user_map[u]].append((t, self.item_map[i], self.cat_map[c]))
        self.events = {u: sorted(ev[u], key=lambda e: e[0]) for u in sorted(ev)}  # stable: ties in file order
        self.kept = [u for u, e in self.events.items() if len(e) >= p.min_pv]
        self.last_cat = {i: c for e in self.events.values() for _, i, c in e}
        self.user_items = {u: {x[1] for x in e} for u, e in self.events.items()}
        self.positives = {}
        for split, offs in OFFSETS.items():
            got = Counter()
            for u in self.kept:
                e = self.events[u]
                for off in offs:
                    t = len(e) - off
                    hist = e[max(0, t - p.max_len):t]
                    got[(u, e[t][1], e[t][2], tuple(h[1] for h in hist),
                         tuple(float(secs(e[t][0]) - secs(h[0])) for h in hist))] += 1
            self.positives[split] = got


def read(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    d = tmp_path_factory.mktemp("tmall")
    path = write_log(d / "user_log_format1.csv", synthetic_rows(0))
    return path, d / "out", convert(path, d / "out", P)


def test_counts_dropped_rows_and_samples(converted: tuple[Path, Path, dict]) -> None:
    path, out, meta = converted
    e = Expected(path, P)
    assert 5 < len(e.kept) < 30 and meta["counts"]["kept_users"] == len(e.kept)
    actions = Counter(r["action_type"] for r in e.rows)
    assert meta["counts"]["csv_rows"] == len(e.rows)
    assert meta["dropped"] == {
        "action_type 1 (cart)": actions["1"], "action_type 2 (buy)": actions["2"], "action_type 3 (fav)": actions["3"],
        "clicks of users with fewer than min_pv=40 clicks": sum(len(v) for u, v in e.events.items() if u not in e.kept),
    }
    assert meta["counts"]["kept_clicks"] + sum(meta["dropped"].values()) == len(e.rows)
    assert meta["sorted_input"] is False
    for split, offs in OFFSETS.items():
        rows = read(out, split)
        assert len(rows) == len(e.kept) * len(offs) * 3 == meta["splits"][split]["rows"]
        got = Counter((r["user_id"], r["item_id"], r["item_category"], tuple(r["hist_item_id"]),
                       tuple(r["hist_time_delta"])) for r in rows if r["label"] == 1.0)
        assert got == e.positives[split], split
        for r in rows:
            if r["label"] == 0.0:
                assert r["item_id"] not in e.user_items[r["user_id"]]
                assert r["item_category"] == e.last_cat[r["item_id"]]
    assert json.loads((out / "meta.json").read_text()) == meta


def test_one_test_sample_by_hand(converted: tuple[Path, Path, dict]) -> None:
    """The first kept user's test target is its last click in (MMDD, file order); its history the 30 clicks
    before, with whole-day time deltas."""
    path, out, _ = converted
    e = Expected(path, P)
    u = e.kept[0]
    raw_user = next(k for k, v in e.user_map.items() if v == u)
    with open(path, newline="") as fh:
        clicks = [r for r in csv.DictReader(fh) if r["action_type"] == "0" and int(r["user_id"]) == raw_user]
    clicks.sort(key=lambda r: int(r["time_stamp"]))  # stable
    target, hist = clicks[-1], clicks[-31:-1]
    row = [r for r in read(out, "test") if r["user_id"] == u][0]
    assert row["label"] == 1.0 and row["item_id"] == e.item_map[int(target["item_id"])]
    assert row["hist_item_id"] == [e.item_map[int(h["item_id"])] for h in hist]
    day = lambda r: date(2015, int(r["time_stamp"]) // 100, int(r["time_stamp"]) % 100)  # noqa: E731
    assert row["hist_time_delta"][0] == 86400.0 * (day(target) - day(hist[0])).days
    assert set(row["hist_behavior_type"]) == {1}


def test_unsorted_file_is_time_ordered(converted: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """The same rows already in (user, MMDD) order (stable, so ties keep their order) are read without a sort
    and give the same files; a single in-memory run gives the same too."""
    path, out, _ = converted
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    ordered = sorted(rows, key=lambda r: (int(r[0]), int(r[5])))
    meta = convert(write_log(tmp_path / "sorted.csv", [tuple(r) for r in ordered]), tmp_path / "a", P)
    assert meta["sorted_input"] is True
    convert(path, tmp_path / "b", replace(P, sort_rows=1 << 20, block_size=1 << 20))
    for split in OFFSETS:
        assert read(tmp_path / "a", split) == read(out, split) == read(tmp_path / "b", split)


def test_columns_in_another_order(tmp_path: Path) -> None:
    rows = synthetic_rows(1, users=8)
    path = tmp_path / "log.csv"
    path.write_text("action_type,time_stamp,brand_id,seller_id,cat_id,item_id,user_id\n"
                    + "".join(",".join(map(str, r[::-1])) + "\n" for r in rows))
    a = convert(path, tmp_path / "a", P)
    b = convert(write_log(tmp_path / "std.csv", rows), tmp_path / "b", P)
    assert a["counts"] == b["counts"] and read(tmp_path / "a", "train") == read(tmp_path / "b", "train")


GOOD = [f"1,{100 + k % 50},7,3,{k},{511 + k % 3},0" for k in range(60)] + [f"2,{k},7,3,,601,0" for k in range(5)]


@pytest.mark.parametrize("line, bad, match", [
    (4, "1,101,7,3,5,511,4", r"line 4, column 'action_type': value '4'; expected an action type 0 \(click\)"),
    (5, "1,101,7,3,5,1340,0", r"line 5, column 'time_stamp': value '1340'; expected a date MMDD of 2015"),
    (6, "1,101,7,3,5,229,0", r"line 6, column 'time_stamp': value '229'; expected a date MMDD of 2015"),
    (7, "1,1x1,7,3,5,511,0", r"line 7, column 'item_id': value '1x1'; expected a non-negative integer id"),
    (8, "1,101,7,3,511,0", r"line 8: 6 fields .*expected 7 columns user_id,item_id,cat_id"),
])
def test_bad_lines(tmp_path: Path, line: int, bad: str, match: str, capsys: pytest.CaptureFixture) -> None:
    lines = [HEADER, *GOOD]
    lines[line - 1] = bad
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    small = ["--min-pv", "20", "--train-targets", "2", "--max-len", "5"]
    assert main(["--input", str(path), "--out", str(tmp_path / "out"), *small]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(rf"data error: .*bad\.csv: {match}", err), err
    assert not (tmp_path / "out").exists()


def test_missing_header_and_no_clicks(tmp_path: Path) -> None:
    path = tmp_path / "nohead.csv"
    path.write_text("\n".join(GOOD) + "\n")
    with pytest.raises(DataError, match=r"nohead\.csv: line 1: missing header .*expected a header naming user_id"):
        convert(path, tmp_path / "out", replace(P, min_pv=20, train_targets=2))
    path.write_text(HEADER + "\n" + "\n".join(g[:-1] + "2" for g in GOOD) + "\n")
    with pytest.raises(DataError, match=r"nohead\.csv: no click rows \(action_type 0\)"):
        convert(path, tmp_path / "out", replace(P, min_pv=20, train_targets=2))


class FailAfterFirstFile:
    real = pq.ParquetWriter
    opened = 0

    def __new__(cls, *args, **kwargs):
        FailAfterFirstFile.opened += 1
        if FailAfterFirstFile.opened > 1:
            raise RuntimeError("disk on fire")
        return cls.real(*args, **kwargs)


def test_failed_conversion_keeps_the_previous_output(converted: tuple[Path, Path, dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = converted
    out = tmp_path / "out"
    meta = convert(path, out, P)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    FailAfterFirstFile.opened = 0
    monkeypatch.setattr(pq, "ParquetWriter", FailAfterFirstFile)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(path, out, replace(P, seed=1))
    monkeypatch.undo()
    assert FailAfterFirstFile.opened == 2
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    cfg = DataConfig(schema=tmall_schema(meta), eval_paths=[str(out / "train" / "*.parquet")], batch_size=64)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == meta["splits"]["train"]["rows"]
    assert all(int(b.id_fixes.sum()) == 0 for b in batches)


def test_cli_prints_dropped_rows(converted: tuple[Path, Path, dict], tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    path, _, meta = converted
    args = ["--min-pv", "40", "--max-len", "30", "--train-targets", "5", "--train-stride", "3", "--seed", "5"]
    assert main(["--input", str(path), "--out", str(tmp_path / "o"), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dropped"] == meta["dropped"] and printed["counts"]["kept_users"] == meta["counts"]["kept_users"]
