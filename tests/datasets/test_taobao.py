"""Tests of datasets.taobao on the real Taobao UserBehavior slice in ../shared/data (114 users), with
every expected value derived independently here in plain Python from the CSV, plus malformed inputs."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets.config import DataConfig
from datasets.reader import eval_loader
from datasets.schema import DataError
from datasets.taobao import TaobaoParams, convert, main, taobao_schema

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT.parent / "shared" / "data" / "taobao_userbehavior_sample.csv"
PARAMS = TaobaoParams(min_pv=50, max_len=100, negatives=2, seed=0, train_targets=9, train_stride=5, row_group_size=500)
OFFSETS = {"train": [3 + 5 * k for k in range(9)], "valid": [2], "test": [1]}


class Expected:
    """DARE's protocol applied to the CSV with plain Python (no numpy, no code from datasets.taobao)."""

    def __init__(self, path: Path, min_pv: int, max_len: int) -> None:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        pv = [(int(u), int(i), int(c), int(t)) for u, i, c, b, t in rows if b == "pv"]
        self.num_users = len({r[0] for r in pv})
        self.user_map = {u: k + 1 for k, u in enumerate(sorted({r[0] for r in pv}))}
        self.item_map = {i: k + 1 for k, i in enumerate(sorted({r[1] for r in pv}))}
        self.cat_map = {c: k + 1 for k, c in enumerate(sorted({r[2] for r in pv}))}
        self.last_cat = {self.item_map[i]: self.cat_map[c] for _, i, c, _ in pv}  # later rows overwrite
        events: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # user -> (ts, item, cat), file order
        for u, i, c, t in pv:
            events[self.user_map[u]].append((t, self.item_map[i], self.cat_map[c]))
        self.events = {u: sorted(ev, key=lambda e: e[0]) for u, ev in events.items()}  # stable
        self.kept = [u for u, ev in self.events.items() if len(ev) >= min_pv]
        self.user_items = {u: {e[1] for e in ev} for u, ev in self.events.items()}
        self.positives: dict[str, Counter] = {}
        for split, offsets in OFFSETS.items():
            samples = Counter()
            for u in self.kept:
                ev = self.events[u]
                for off in offsets:
                    t = len(ev) - off
                    hist = ev[max(0, t - max_len) : t]
                    samples[
                        (u, ev[t][1], ev[t][2], tuple(h[1] for h in hist), tuple(h[2] for h in hist),
                         tuple(float(ev[t][0] - h[0]) for h in hist))
                    ] += 1
            self.positives[split] = samples


@pytest.fixture(scope="module")
def expected() -> Expected:
    assert SAMPLE.is_file(), f"the real Taobao slice is expected at {SAMPLE} (../shared/data from the repo root)"
    return Expected(SAMPLE, PARAMS.min_pv, PARAMS.max_len)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("taobao")
    return out, convert(SAMPLE, out, PARAMS)


def read_rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


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
    for split, offsets in OFFSETS.items():
        rows = read_rows(out, split)
        assert len(rows) == k * len(offsets) * 3 == meta["splits"][split]["rows"]
        assert [r["label"] for r in rows] == [1.0, 0.0, 0.0] * (k * len(offsets))
        assert meta["splits"][split]["positives"] == k * len(offsets)
    assert json.loads((out / "meta.json").read_text()) == meta


def test_positive_samples_follow_the_protocol(expected: Expected, converted: tuple[Path, dict]) -> None:
    out, _ = converted
    for split in OFFSETS:
        got = Counter(
            (r["user_id"], r["item_id"], r["item_category"], tuple(r["hist_item_id"]), tuple(r["hist_category"]),
             tuple(r["hist_time_delta"]))
            for r in read_rows(out, split)
            if r["label"] == 1.0
        )
        assert got == expected.positives[split], split


def test_one_history_equals_the_raw_pv_sequence(expected: Expected, converted: tuple[Path, dict]) -> None:
    """The longest user's first training target (-3): its history is the 100 pv items before it."""
    out, _ = converted
    with open(SAMPLE, newline="") as fh:
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
        rows = read_rows(out, split)
        for i, r in enumerate(rows):
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


def test_reader_reads_converted_data(converted: tuple[Path, dict]) -> None:
    out, meta = converted
    cfg = DataConfig(schema=taobao_schema(meta), eval_paths=[str(out / "train" / "*.parquet")], batch_size=256)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == meta["splits"]["train"]["rows"]
    assert all(int(b.id_fixes.sum()) == 0 for b in batches)


def test_deterministic_and_independent_of_block_size(converted: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = converted
    convert(SAMPLE, tmp_path / "same", replace(PARAMS, block_size=4096))  # ~100 CSV blocks, users span blocks
    convert(SAMPLE, tmp_path / "seed", replace(PARAMS, seed=1))
    for split in OFFSETS:
        base = read_rows(out, split)
        assert read_rows(tmp_path / "same", split) == base
        other = read_rows(tmp_path / "seed", split)
        assert [r for r in other if r["label"] == 1.0] == [r for r in base if r["label"] == 1.0]
    assert [r["item_id"] for r in read_rows(tmp_path / "seed", "train")] != [r["item_id"] for r in read_rows(out, "train")]


def test_min_pv_must_cover_the_deepest_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"min_pv >= 94"):
        convert(SAMPLE, tmp_path, TaobaoParams(min_pv=50))


def write_csv(tmp_path: Path, lines: list[str], name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [f"{1 + k // 60},{100 + k},{7 + k % 3},pv,{1511000000 + k}" for k in range(120)]


@pytest.mark.parametrize(
    "line, bad, match",
    [
        (3, "1,2,pv,1511000000", r"line 3: 4 fields .* expected 5 columns user_id,item_id,category_id,behavior_type,timestamp"),
        (2, "1,101,7,click,1511000001", r"line 2, column 'behavior_type': value 'click'; expected one of pv\|cart\|fav\|buy"),
        (90, "2,12x,7,pv,1511000089", r"line 90, column 'item_id': value '12x'; expected a non-negative integer id"),
        (100, "2,199,7,pv,1511000099.5", r"line 100, column 'timestamp': value '1511000099.5'; expected an integer unix"),
        (110, "1,210,7,pv,1511000109", r"line 110, column 'user_id': user 1 appears again .* grouped by user"),
    ],
)
def test_malformed_rows(tmp_path: Path, line: int, bad: str, match: str) -> None:
    lines = list(GOOD)
    lines[line - 1] = bad
    path = write_csv(tmp_path, lines)
    with pytest.raises(DataError, match=rf"bad\.csv: {match}"):
        convert(path, tmp_path / "out", TaobaoParams(min_pv=50, train_targets=2, block_size=1024))


def test_small_valid_csv_and_unreadable_file(tmp_path: Path) -> None:
    meta = convert(write_csv(tmp_path, GOOD, "ok.csv"), tmp_path / "out", TaobaoParams(min_pv=50, train_targets=2))
    assert meta["counts"]["kept_users"] == 2 and meta["splits"]["train"]["rows"] == 2 * 2 * 3
    with pytest.raises(DataError, match=r"missing\.csv: cannot read as CSV"):
        convert(tmp_path / "missing.csv", tmp_path / "out2", PARAMS)


def test_cli(tmp_path: Path) -> None:
    meta = main(["--input", str(SAMPLE), "--out", str(tmp_path), "--min-pv", "94", "--max-len", "200",
                 "--negatives", "1", "--seed", "3"])
    assert meta["params"]["train_targets"] == 19
    users = meta["counts"]["kept_users"]
    assert users == 34
    assert meta["splits"]["train"]["rows"] == users * 19 * 2
    assert (tmp_path / "valid" / "part-00000.parquet").is_file()
