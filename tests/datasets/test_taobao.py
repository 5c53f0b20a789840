"""Tests of datasets.taobao on the real Taobao UserBehavior slice in ../shared/data (114 users), with
every expected value derived independently here in plain Python from the CSV; on generated files
(labelled synthetic) in every row order; malformed inputs through the CLI; atomic output."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets.config import DataConfig
from datasets.convert_io import OutputError
from datasets.reader import eval_loader
from datasets.schema import DataError
from datasets.taobao import TaobaoParams, convert, main, taobao_schema

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = TaobaoParams(min_pv=50, max_len=100, negatives=2, seed=0, train_targets=9, train_stride=5, row_group_size=500)
OFFSETS = {"train": [3 + 5 * k for k in range(9)], "valid": [2], "test": [1]}


def offsets_of(p: TaobaoParams) -> dict[str, list[int]]:
    return {"train": [3 + p.train_stride * k for k in range(p.train_targets)], "valid": [2], "test": [1]}


class Expected:
    """DARE's protocol applied to the CSV with plain Python (no numpy, no code from datasets.taobao): each
    user's pv events stably sorted by timestamp (ties in file order), users in id order."""

    def __init__(self, path: Path, min_pv: int, max_len: int, offsets: dict[str, list[int]] = OFFSETS) -> None:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        pv = [(int(u), int(i), int(c), int(t)) for u, i, c, b, t in rows if b == "pv"]
        self.num_users = len({r[0] for r in pv})
        self.user_map = {u: k + 1 for k, u in enumerate(sorted({r[0] for r in pv}))}
        self.item_map = {i: k + 1 for k, i in enumerate(sorted({r[1] for r in pv}))}
        self.cat_map = {c: k + 1 for k, c in enumerate(sorted({r[2] for r in pv}))}
        events: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # user -> (ts, item, cat), file order
        for u, i, c, t in pv:
            events[self.user_map[u]].append((t, self.item_map[i], self.cat_map[c]))
        self.events = {u: sorted(events[u], key=lambda e: e[0]) for u in sorted(events)}  # stable
        # a negative's category: the item's last pv event with users in id order, each in time order
        self.last_cat = {i: c for ev in self.events.values() for _, i, c in ev}  # later events overwrite
        self.kept = [u for u, ev in self.events.items() if len(ev) >= min_pv]
        self.user_items = {u: {e[1] for e in ev} for u, ev in self.events.items()}
        self.positives: dict[str, Counter] = {}
        for split, offs in offsets.items():
            samples = Counter()
            for u in self.kept:
                ev = self.events[u]
                for off in offs:
                    t = len(ev) - off
                    hist = ev[max(0, t - max_len) : t]
                    samples[
                        (u, ev[t][1], ev[t][2], tuple(h[1] for h in hist), tuple(h[2] for h in hist),
                         tuple(float(ev[t][0] - h[0]) for h in hist))
                    ] += 1
            self.positives[split] = samples


@pytest.fixture(scope="module")
def expected(taobao_sample: Path) -> Expected:
    return Expected(taobao_sample, PARAMS.min_pv, PARAMS.max_len)


@pytest.fixture(scope="module")
def converted(taobao_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("taobao") / "out"
    return out, convert(taobao_sample, out, PARAMS)


def read_rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def positives_of(out: Path, split: str) -> Counter:
    return Counter(
        (r["user_id"], r["item_id"], r["item_category"], tuple(r["hist_item_id"]), tuple(r["hist_category"]),
         tuple(r["hist_time_delta"]))
        for r in read_rows(out, split)
        if r["label"] == 1.0
    )


def check_negatives(out: Path, expected: Expected, split: str) -> None:
    rows = read_rows(out, split)
    for r in rows:
        if r["label"] == 1.0:
            positive = r
            continue
        assert r["user_id"] == positive["user_id"]
        assert r["hist_item_id"] == positive["hist_item_id"]
        assert r["hist_time_delta"] == positive["hist_time_delta"]
        assert r["item_id"] not in r["hist_item_id"]
        assert r["item_id"] not in expected.user_items[r["user_id"]]  # DARE: never clicked by the user
        assert r["item_category"] == expected.last_cat[r["item_id"]]
        assert 1 <= r["item_id"] <= len(expected.item_map)


def test_counts_and_table_sizes(expected: Expected, converted: tuple[Path, dict]) -> None:
    out, meta = converted
    k = len(expected.kept)
    assert k == 64
    assert meta["counts"]["kept_users"] == k
    assert meta["counts"]["csv_rows"] == 10_000 and meta["counts"]["csv_users"] == 114
    assert meta["counts"]["pv_rows"] == sum(len(ev) for ev in expected.events.values())
    assert meta["num_ids"] == {"user_id": expected.num_users, "item_id": len(expected.item_map),
                               "item_category": len(expected.cat_map)}
    assert meta["table_sizes"]["t_item_id"] == len(expected.item_map) + 1
    assert meta["sorted_input"] is False  # the slice is grouped by user, in string order of the ids: resorted
    for split, offsets in OFFSETS.items():
        rows = read_rows(out, split)
        assert len(rows) == k * len(offsets) * 3 == meta["splits"][split]["rows"]
        assert [r["label"] for r in rows] == [1.0, 0.0, 0.0] * (k * len(offsets))
        assert [r["user_id"] for r in rows[:: 3 * len(offsets)]] == expected.kept  # users in id order
        assert meta["splits"][split]["positives"] == k * len(offsets)
    assert json.loads((out / "meta.json").read_text()) == meta


def test_positive_samples_follow_the_protocol(expected: Expected, converted: tuple[Path, dict]) -> None:
    out, _ = converted
    for split in OFFSETS:
        assert positives_of(out, split) == expected.positives[split], split


def test_one_history_equals_the_raw_pv_sequence(
    taobao_sample: Path, expected: Expected, converted: tuple[Path, dict]
) -> None:
    """The longest user's first training target (-3): its history is the 100 pv items before it."""
    out, _ = converted
    with open(taobao_sample, newline="") as fh:
        raw = [r for r in csv.reader(fh) if r[3] == "pv"]
    by_user = Counter(r[0] for r in raw)
    raw_user, n = by_user.most_common(1)[0]
    seq = [r for r in raw if r[0] == raw_user]  # the slice is time-ordered within a user
    target = seq[n - 3]
    want_hist = [expected.item_map[int(r[1])] for r in seq[n - 3 - 100 : n - 3]]
    uid = expected.user_map[int(raw_user)]
    rows = [r for r in read_rows(out, "train") if r["user_id"] == uid and r["label"] == 1.0]
    first = rows[0]  # targets are written deepest-offset-first: -3 first
    assert first["item_id"] == expected.item_map[int(target[1])]
    assert first["item_category"] == expected.cat_map[int(target[2])]
    assert first["hist_item_id"] == want_hist and len(want_hist) == 100
    assert first["hist_time_delta"][-1] == float(int(target[4]) - int(seq[n - 4][4]))
    assert first["hist_behavior_type"] == [1] * 100


def test_negatives(expected: Expected, converted: tuple[Path, dict]) -> None:
    out, _ = converted
    for split in OFFSETS:
        check_negatives(out, expected, split)


def test_reader_reads_converted_data(converted: tuple[Path, dict]) -> None:
    out, meta = converted
    cfg = DataConfig(schema=taobao_schema(meta), eval_paths=[str(out / "train" / "*.parquet")], batch_size=256)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == meta["splits"]["train"]["rows"]
    assert all(int(b.id_fixes.sum()) == 0 for b in batches)


def test_deterministic_and_independent_of_block_size(
    taobao_sample: Path, converted: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = converted
    convert(taobao_sample, tmp_path / "same", replace(PARAMS, block_size=4096))  # ~100 CSV blocks
    convert(taobao_sample, tmp_path / "seed", replace(PARAMS, seed=1))
    for split in OFFSETS:
        base = read_rows(out, split)
        assert read_rows(tmp_path / "same", split) == base
        other = read_rows(tmp_path / "seed", split)
        assert [r for r in other if r["label"] == 1.0] == [r for r in base if r["label"] == 1.0]
    assert [r["item_id"] for r in read_rows(tmp_path / "seed", "train")] != [r["item_id"] for r in read_rows(out, "train")]


def test_min_pv_must_cover_the_deepest_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"min_pv >= 94"):
        convert(tmp_path / "any.csv", tmp_path / "out", TaobaoParams(min_pv=50))


# ------------------------------------------------------------------------------------------ row order

CsvRow = tuple[int, int, int, str, int]


def write_rows(path: Path, rows: list[CsvRow]) -> Path:
    path.write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in rows))
    return path


def layouts(rows: list[CsvRow]) -> dict[str, list[CsvRow]]:
    """Row orders that keep every user's rows with equal timestamps in their relative order (all stable
    sorts of ``rows``): the converter must give the same output for all of them."""
    return {
        "as_given": rows,
        "user_then_time": sorted(rows, key=lambda r: (r[0], r[4])),  # read as is, no sort
        "time": sorted(rows, key=lambda r: r[4]),  # the time-ordered slices people pass around
        "grouped_string_order": sorted(rows, key=lambda r: (str(r[0]), r[4])),  # like the real file
        "reversed_users": sorted(rows, key=lambda r: (-r[0], r[4])),
    }


def read_dataset(out: Path) -> dict[str, tuple]:
    """Every part file of every split: (table, row-group sizes), and meta.json without its source."""
    got: dict[str, tuple] = {}
    for path in sorted(out.glob("*/part-*.parquet")):
        f = pq.ParquetFile(path)
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        got[str(path.relative_to(out))] = (f.read(), sizes)
    meta = json.loads((out / "meta.json").read_text())
    del meta["source"], meta["sorted_input"]
    got["meta"] = (meta,)
    return got


def assert_same_dataset(a: Path, b: Path) -> None:
    da, db = read_dataset(a), read_dataset(b)
    assert da.keys() == db.keys()
    for name in da:
        if name == "meta":
            assert da[name] == db[name]
        else:
            assert da[name][1] == db[name][1], name
            assert da[name][0].equals(db[name][0]), name


def random_rows(seed: int, users: int = 40) -> list[CsvRow]:
    """Synthetic rows in random order: user ids whose string order differs from their numeric order, many
    equal timestamps within a user, items whose category changes between events, some non-pv rows."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 3000), users, replace=False)
    rows: list[CsvRow] = []
    for u in ids.tolist():
        n = int(rng.integers(20, 90))
        items = rng.zipf(1.3, n) % 400 + 1
        cats = items % 23 + (rng.random(n) < 0.1)  # an item sometimes shows up in another category
        ts = 1511500000 + np.sort(rng.integers(0, 60, n))  # many ties
        btype = np.where(rng.random(n) < 0.85, "pv", rng.choice(["buy", "cart", "fav"], n))
        rows += list(zip([u] * n, items.tolist(), cats.tolist(), btype.tolist(), ts.tolist()))
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


SMALL = TaobaoParams(min_pv=40, max_len=30, negatives=2, seed=5, train_targets=5, train_stride=3,
                     row_group_size=97, rows_per_file=300, users_per_group=7, block_size=1024, sort_rows=150)


def test_any_row_order_gives_the_same_output(tmp_path: Path) -> None:
    """Synthetic rows: the same rows in five orders convert to identical files (every table, every row
    group, meta.json), which follow the protocol; only the already sorted file skips the sort."""
    rows = random_rows(0)
    expected = None
    for name, ordered in layouts(rows).items():
        csv_path = write_rows(tmp_path / f"{name}.csv", ordered)
        meta = convert(csv_path, tmp_path / name, SMALL)
        assert meta["sorted_input"] == (name == "user_then_time"), name
        if expected is None:
            expected = Expected(csv_path, SMALL.min_pv, SMALL.max_len, offsets_of(SMALL))
            assert 5 < len(expected.kept) < 40 and meta["counts"]["kept_users"] == len(expected.kept)
            assert meta["counts"]["csv_rows"] == len(rows) > 10 * SMALL.sort_rows  # several runs
            assert len(list((tmp_path / name / "train").glob("part-*.parquet"))) > 1
            for split in offsets_of(SMALL):
                assert positives_of(tmp_path / name, split) == expected.positives[split]
                check_negatives(tmp_path / name, expected, split)
        else:
            assert_same_dataset(tmp_path / name, tmp_path / "as_given")
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_time_ordered_real_slice_equals_the_grouped_slice(taobao_sample: Path, tmp_path: Path) -> None:
    with open(taobao_sample, newline="") as fh:
        rows = [(int(u), int(i), int(c), b, int(t)) for u, i, c, b, t in csv.reader(fh)]
    params = replace(PARAMS, block_size=8192, sort_rows=1500, rows_per_file=1000)
    for name, ordered in layouts(rows).items():
        convert(write_rows(tmp_path / f"{name}.csv", ordered), tmp_path / name, params)
    convert(taobao_sample, tmp_path / "file", params)
    for name in [*layouts(rows), "file"]:
        assert_same_dataset(tmp_path / name, tmp_path / "user_then_time")


def test_time_ordered_generated_log_equals_the_grouped_log(taobao_like_tool: Path, tmp_path: Path) -> None:
    """A log of ../shared/tools/taobao_like.py (synthetic; grouped by user in increasing id order),
    shuffled into time order, converts to the same files."""
    grouped = tmp_path / "grouped.csv"
    subprocess.run(
        [sys.executable, str(taobao_like_tool), "--users", "60", "--items", "3000", "--categories", "60",
         "--min-events", "60", "--max-events", "150", "--seed", "1", "--out", str(grouped)],
        check=True, capture_output=True,
    )
    rows = [(int(u), int(i), int(c), b, int(t)) for u, i, c, b, t in csv.reader(grouped.open(newline=""))]
    write_rows(tmp_path / "time.csv", sorted(rows, key=lambda r: r[4]))
    params = replace(SMALL, min_pv=60, max_len=50, train_targets=9, train_stride=5, sort_rows=1000, block_size=4096)
    a = convert(grouped, tmp_path / "a", params)
    b = convert(tmp_path / "time.csv", tmp_path / "b", params)
    assert a["sorted_input"] and not b["sorted_input"] and a["counts"]["kept_users"] == 60
    assert_same_dataset(tmp_path / "a", tmp_path / "b")


# -------------------------------------------------------------------------------------- bad input, CLI

GOOD = [f"{1 + k // 60},{100 + k},{7 + k % 3},pv,{1511000000 + k}" for k in range(120)]
TINY = TaobaoParams(min_pv=50, train_targets=2, block_size=1024)
TINY_ARGS = ["--min-pv", "50", "--train-targets", "2"]


def write_csv(tmp_path: Path, lines: list[str], name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line, bad, match",
    [
        (3, "1,2,pv,1511000000", r"line 3: 4 fields .* expected 5 columns user_id,item_id,category_id,behavior_type,timestamp"),
        (2, "1,101,7,click,1511000001", r"line 2, column 'behavior_type': value 'click'; expected one of pv\|cart\|fav\|buy"),
        (90, "2,12x,7,pv,1511000089", r"line 90, column 'item_id': value '12x'; expected a non-negative integer id"),
        (100, "2,199,7,pv,1511000099.5", r"line 100, column 'timestamp': value '1511000099.5'; expected an integer unix"),
        (110, "2,199,7,pv,", r"line 110, column 'timestamp': value ''; expected an integer unix"),
    ],
)
def test_malformed_rows(tmp_path: Path, line: int, bad: str, match: str) -> None:
    lines = list(GOOD)
    lines[line - 1] = bad
    path = write_csv(tmp_path, lines)
    with pytest.raises(DataError, match=rf"bad\.csv: {match}"):
        convert(path, tmp_path / "out", TINY)
    # the same error after the file needs sorting: rows out of order before the bad line
    lines[0], lines[61] = lines[61], lines[0]
    path = write_csv(tmp_path, lines)
    with pytest.raises(DataError, match=rf"bad\.csv: {match}"):
        convert(path, tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_small_valid_csv(tmp_path: Path) -> None:
    meta = convert(write_csv(tmp_path, GOOD, "ok.csv"), tmp_path / "out", TINY)
    assert meta["counts"]["kept_users"] == 2 and meta["splits"]["train"]["rows"] == 2 * 2 * 3


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """main(args): (exit code, stderr), checking that stderr is at most one line."""
    code = main(args)
    err = capsys.readouterr().err
    assert err.count("\n") <= 1, err
    return code, err.strip()


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One input per class of expected input problem: (file, what the message must say)."""
    lines = list(GOOD)
    lines[2] = "1,2,pv,1511000000"
    malformed = write_csv(tmp_path, lines, "malformed.csv")
    lines = list(GOOD)
    lines[99] = "2,199,7,pv,2017-11-25"
    timestamp = write_csv(tmp_path, lines, "timestamp.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 40)
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("\n".join(GOOD[:5] + ["1,caf\xe9,7,pv,1511000005"]).encode("latin-1"))
    both_see_all = [f"{u},{100 + k},7,pv,{1511000000 + k}" for u in (1, 2) for k in range(60)]
    seen_all = write_csv(tmp_path, both_see_all, "seen.csv")
    few = write_csv(tmp_path, GOOD[:100], "few.csv")  # user 2 has 40 pv events, user 1 60: min_pv 61 keeps none
    return {
        "malformed line": (malformed, r"malformed\.csv: line 3: 4 fields"),
        "bad timestamp": (timestamp, r"timestamp\.csv: line 100, column 'timestamp': value '2017-11-25'"),
        "empty file": (empty, r"empty\.csv: empty file"),
        "missing file": (tmp_path / "missing.csv", r"missing\.csv: no such file"),
        "folder": (folder, r"folder\.csv: is a folder"),
        "binary file": (binary, r"binary\.csv: line 1: 1 fields"),
        "not utf-8": (latin, r"latin1\.csv: cannot read as CSV from line 1 on: .*invalid UTF8"),
        "no negatives": (seen_all, r"seen\.csv: no negatives for 2 users .* viewed \(nearly\) all 60 items"),
        "all users filtered": (few, r"few\.csv: no user has min_pv=61 pv events: all 2 users .* most active has 60"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed line", "bad timestamp", "empty file", "missing file", "folder", "binary file", "not utf-8",
     "no negatives", "all users filtered"],
)
def test_cli_bad_input_is_one_line_and_exit_3(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, message = bad_inputs(tmp_path)[case]
    min_pv = "61" if case == "all users filtered" else "50"
    code, err = run_cli(["--input", str(path), "--out", str(tmp_path / "out"), "--min-pv", min_pv,
                         "--train-targets", "2"], capsys)
    assert code == 3
    assert err.startswith("data error: ") and str(tmp_path) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root (or no POSIX uid) reads any file")
def test_cli_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_csv(tmp_path, GOOD, "secret.csv")
    path.chmod(0)
    code, err = run_cli(["--input", str(path), "--out", str(tmp_path / "out"), *TINY_ARGS], capsys)
    assert code == 3 and "secret.csv: cannot read: Permission denied" in err


def test_cli_as_a_process_exits_3_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "datasets.taobao", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert r.returncode == 3
    assert r.stderr == f"data error: {tmp_path / 'nope.csv'}: no such file\n"


def test_cli(taobao_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["--input", str(taobao_sample), "--out", str(out), "--min-pv", "94", "--max-len", "200",
                 "--negatives", "1", "--seed", "3", "--row-group-size", "300", "--rows-per-file", "1000"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["counts"]["kept_users"] == 34
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["train_targets"] == 19 and meta["params"]["row_group_size"] == 300
    users = meta["counts"]["kept_users"]
    assert meta["splits"]["train"]["rows"] == users * 19 * 2 == 1292
    files = sorted((out / "train").glob("part-*.parquet"))
    sizes = [[f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
             for f in map(pq.ParquetFile, files)]
    assert sizes == [[300, 300, 300, 100], [292]]
    assert (out / "valid" / "part-00000.parquet").is_file()


def test_cli_bad_arguments_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--input", "x.csv", "--out", str(tmp_path), "--row-group-size", "0"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------- atomic output

SMALL_ARGS = ["--min-pv", "40", "--max-len", "30", "--negatives", "2", "--train-targets", "5", "--train-stride", "3",
              "--row-group-size", "97", "--rows-per-file", "300"]


def good_conversion(tmp_path: Path) -> tuple[Path, dict, dict]:
    """A finished conversion of synthetic rows into ``tmp_path/out``: (the CSV, meta, the files read back)."""
    csv_path = write_rows(tmp_path / "rows.csv", random_rows(1))
    meta = convert(csv_path, tmp_path / "out", replace(SMALL, sort_rows=1 << 22))
    assert meta["splits"]["train"]["files"] > 1
    return csv_path, meta, read_dataset(tmp_path / "out")


def assert_unchanged(out: Path, before: dict, meta: dict) -> None:
    after = read_dataset(out)
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] if k == "meta" else after[k][0].equals(before[k][0]) for k in after)
    cfg = DataConfig(schema=taobao_schema(meta), eval_paths=[str(out / "train" / "*.parquet")], batch_size=64)
    assert sum(int(b.valid.sum()) for b in eval_loader(cfg, 0, 1)) == meta["splits"]["train"]["rows"]


class FailAfterFirstFile:
    """Stands in for pq.ParquetWriter: the first file is written, opening the second raises."""

    real = pq.ParquetWriter
    opened = 0

    def __new__(cls, *args, **kwargs):
        FailAfterFirstFile.opened += 1
        if FailAfterFirstFile.opened > 1:
            raise RuntimeError("disk on fire")
        return cls.real(*args, **kwargs)


def test_failed_conversion_keeps_the_previous_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path, meta, before = good_conversion(tmp_path)
    FailAfterFirstFile.opened = 0
    monkeypatch.setattr(pq, "ParquetWriter", FailAfterFirstFile)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(csv_path, tmp_path / "out", replace(SMALL, seed=1))
    assert FailAfterFirstFile.opened == 2  # it did fail mid-way
    monkeypatch.undo()
    assert_unchanged(tmp_path / "out", before, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rows.csv"]  # the temporary folder is gone


def test_killed_conversion_keeps_the_previous_data_set(tmp_path: Path) -> None:
    """SIGKILL (as the OOM killer sends) right after the first new file is complete."""
    csv_path, meta, before = good_conversion(tmp_path)
    script = (
        "import os, signal, sys\n"
        "import pyarrow.parquet as pq\n"
        "from datasets.taobao import main\n"
        "class Dying(pq.ParquetWriter):\n"
        "    def close(self):\n"
        "        super().close()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "pq.ParquetWriter = Dying\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, "--input", str(csv_path), "--out", str(tmp_path / "out"), "--seed", "1",
         *SMALL_ARGS],
        cwd=REPO_ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert r.returncode == -9, r.stderr
    assert_unchanged(tmp_path / "out", before, meta)
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("out", "rows.csv")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.tmp-")  # what a kill leaves beside
    assert len(list((leftovers[0] / "train").glob("part-*.parquet"))) == 1
    # a new run replaces the data set
    assert main(["--input", str(csv_path), "--out", str(tmp_path / "out"), "--seed", "1", *SMALL_ARGS]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["params"]["seed"] == 1 != meta["params"]["seed"]


def test_refuses_to_replace_a_folder_that_is_not_a_conversion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv_path = write_csv(tmp_path, GOOD, "ok.csv")  # tmp_path holds ok.csv: not a previous output
    with pytest.raises(OutputError, match=r"holds ok\.csv, which a previous output would not"):
        convert(csv_path, tmp_path, TINY)
    out = tmp_path / "out"
    convert(csv_path, out, TINY)
    (out / "train" / "notes.txt").write_text("mine")
    code, err = run_cli(["--input", str(csv_path), "--out", str(out), *TINY_ARGS], capsys)
    assert code == 2 and "train/notes.txt" in err and (out / "train" / "notes.txt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["--input", str(csv_path), "--out", str(empty), *TINY_ARGS], capsys)[0] == 0
    assert (empty / "meta.json").is_file()
