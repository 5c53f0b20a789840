"""Tests of datasets.synthetic (synthetic data): planted structure, heavy tails, layout, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets.canonical import canonical_arrow_schema
from datasets.config import DataConfig
from datasets.reader import eval_loader
from datasets.synthetic import SyntheticParams, generate, main, synthetic_schema

PARAMS = SyntheticParams(
    num_samples=6000,
    num_eval_samples=500,
    num_users=500,
    num_items=5000,
    num_categories=200,
    num_clusters=20,
    max_seq_len=1000,
    files=2,
    row_group_size=1000,
    seed=0,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, PARAMS)


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """Flat numpy columns of a split, read row group by row group. Shapes: R rows, E behaviours."""
    cols: dict[str, list[np.ndarray]] = {}
    for path in sorted((out / split).glob("part-*.parquet")):
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            for name in t.column_names:
                arr = t[name].combine_chunks()
                if name.startswith("hist_"):
                    cols.setdefault(name, []).append(arr.flatten().to_numpy())
                    if name == "hist_item_id":
                        cols.setdefault("lengths", []).append(np.diff(arr.offsets.to_numpy()))
                else:
                    cols.setdefault(name, []).append(arr.to_numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def test_auc_helper() -> None:
    assert auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_whole_history_beats_last_50(data: tuple[Path, dict]) -> None:
    d = read_split(data[0], "train")
    lengths, rel = d["lengths"], d["hist_relevance"]
    row = np.repeat(np.arange(len(lengths)), lengths)
    pos_in_row = np.arange(len(rel)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    last50 = pos_in_row >= np.repeat(lengths - 50, lengths)
    whole = np.bincount(row, weights=rel, minlength=len(lengths))
    recent = np.bincount(row[last50], weights=rel[last50], minlength=len(lengths))
    auc_whole, auc_recent = auc(whole, d["label"]), auc(recent, d["label"])
    assert auc_whole > 0.75, auc_whole
    assert auc_whole - auc_recent > 0.03, (auc_whole, auc_recent)


def test_heavy_tails(data: tuple[Path, dict]) -> None:
    d = read_split(data[0], "train")
    counts = np.sort(np.bincount(d["hist_item_id"], minlength=PARAMS.num_items + 1)[1:])[::-1]
    top = counts[: PARAMS.num_items // 100].sum() / counts.sum()
    assert top > 0.10, top  # top 1% of items hold > 10% of behaviours
    lengths = d["lengths"]
    assert lengths.min() >= 1 and lengths.max() <= PARAMS.max_seq_len
    assert lengths.max() >= 5 * np.median(lengths), (lengths.max(), np.median(lengths))


def test_values_follow_the_schema(data: tuple[Path, dict]) -> None:
    out, meta = data
    d = read_split(out, "train")
    for name, n in (("user_id", PARAMS.num_users), ("item_id", PARAMS.num_items), ("item_category", PARAMS.num_categories),
                    ("hist_item_id", PARAMS.num_items), ("hist_category", PARAMS.num_categories)):
        assert d[name].min() >= 1 and d[name].max() <= n, name  # ids from 1, 0 is padding
    assert set(np.unique(d["hist_behavior_type"])) == {1, 2, 3, 4}
    assert set(np.unique(d["label"])) == {0.0, 1.0}
    assert 0.2 <= d["label"].mean() <= 0.4
    assert abs(meta["splits"]["train"]["positive_rate"] - d["label"].mean()) < 1e-9
    assert ((d["hist_relevance"] >= 0) & (d["hist_relevance"] <= 1)).all()
    # time deltas: positive, decreasing along each (oldest-first) history (ties only from float32 rounding)
    delta, lengths = d["hist_time_delta"], d["lengths"]
    assert (delta > 0).all()
    same_row = np.ones(len(delta) - 1, dtype=bool)
    same_row[np.cumsum(lengths)[:-1] - 1] = False
    steps = np.diff(delta)[same_row]
    assert (steps <= 0).all() and (steps < 0).mean() > 0.99
    assert meta["table_sizes"] == {"t_user_id": 501, "t_item_id": 5001, "t_item_category": 201, "t_hist_behavior_type": 5}
    assert json.loads((out / "meta.json").read_text()) == meta


def test_files_and_row_groups(data: tuple[Path, dict]) -> None:
    out, _ = data
    train = sorted((out / "train").glob("part-*.parquet"))
    assert [p.name for p in train] == ["part-00000.parquet", "part-00001.parquet"]
    for p in train:
        md = pq.ParquetFile(p).metadata
        assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [1000, 1000, 1000]
        assert pq.ParquetFile(p).schema_arrow.equals(canonical_arrow_schema(with_relevance=True))
    evals = sorted((out / "eval").glob("part-*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in evals] == [250, 250]


def test_deterministic_with_seed(tmp_path: Path) -> None:
    small = SyntheticParams(num_samples=300, num_eval_samples=50, num_users=50, num_items=400, num_categories=40,
                            num_clusters=8, max_seq_len=100, files=2, row_group_size=64, seed=11)
    generate(tmp_path / "a", small)
    generate(tmp_path / "b", small)
    small.seed = 12
    generate(tmp_path / "c", small)
    for split in ("train", "eval"):
        a, b, c = (read_split(tmp_path / x, split) for x in "abc")
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["hist_item_id"][:100], c["hist_item_id"][:100])


def test_reader_reads_synthetic_data(data: tuple[Path, dict]) -> None:
    out, _ = data
    cfg = DataConfig(schema=synthetic_schema(PARAMS, with_relevance=True), eval_paths=[str(out / "eval" / "*.parquet")],
                     batch_size=128, max_sequence_length=200)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == 500
    b = batches[0]
    assert b.float_sequences.keys() == ["hist_time_delta", "hist_relevance"]
    assert int(b.sparse_features["hist_item_id"].lengths().max()) <= 200
    assert b.sparse_features["hist_item_id"].lengths().tolist() == b.float_sequences["hist_relevance"].lengths().tolist()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--out", str(tmp_path / "out"), "--num-samples", "100", "--num-eval-samples", "20",
                 "--num-users", "10", "--num-items", "200", "--num-categories", "20", "--max-seq-len", "30",
                 "--files", "1", "--row-group-size", "40", "--seed", "3"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert json.loads(capsys.readouterr().out)["table_sizes"] == meta["table_sizes"]
    assert meta["splits"]["train"]["rows"] == 100 and meta["params"]["seed"] == 3
    md = pq.ParquetFile(tmp_path / "out" / "train" / "part-00000.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [40, 40, 20]
    assert meta["params"]["max_seq_len"] == 30


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "a"), "--num-samples", "0"])
    assert e.value.code == 2 and "num_samples >= 1" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path), "--num-samples", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("output error: ") and "notes.txt" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_write_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "ParquetWriter", no_space)
    assert main(["--out", str(tmp_path / "out"), "--num-samples", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "out").exists()


TINY = SyntheticParams(num_samples=400, num_eval_samples=100, num_users=20, num_items=300, num_categories=30,
                       num_clusters=5, max_seq_len=50, files=2, row_group_size=64, seed=1)


class FailAfterFirstFile:
    """Stands in for pq.ParquetWriter: the first file is written, opening the second raises."""

    real = pq.ParquetWriter
    opened = 0

    def __new__(cls, *args, **kwargs):
        FailAfterFirstFile.opened += 1
        if FailAfterFirstFile.opened > 1:
            raise RuntimeError("disk on fire")
        return cls.real(*args, **kwargs)


def test_failed_generation_keeps_the_previous_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    meta = generate(out, TINY)
    before = {s: read_split(out, s) for s in ("train", "eval")}
    FailAfterFirstFile.opened = 0
    monkeypatch.setattr(pq, "ParquetWriter", FailAfterFirstFile)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(out, SyntheticParams(**{**TINY.__dict__, "seed": 2}))
    assert FailAfterFirstFile.opened == 2  # it did fail mid-way
    monkeypatch.undo()
    assert json.loads((out / "meta.json").read_text()) == meta
    for split, cols in before.items():
        after = read_split(out, split)
        assert after.keys() == cols.keys() and all(np.array_equal(after[k], cols[k]) for k in cols)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder is gone
    cfg = DataConfig(schema=synthetic_schema(TINY), eval_paths=[str(out / "eval" / "*.parquet")], batch_size=32)
    assert sum(int(b.valid.sum()) for b in eval_loader(cfg, 0, 1)) == 100
    # a successful run replaces it
    assert generate(out, SyntheticParams(**{**TINY.__dict__, "seed": 2}))["params"]["seed"] == 2
    assert json.loads((out / "meta.json").read_text())["params"]["seed"] == 2
