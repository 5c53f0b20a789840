"""Tests of exact epochs (``train_loader(..., epochs=E)``): every training row exactly once per epoch across
ranks and workers for uneven row groups, equal steps on every rank, padding or drop_last, reshuffled epochs,
exact resumes mid-epoch that read only what they yield, and the infinite stream left as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pyarrow.parquet as pq
import pytest
import torch

from datasets.batch import Batch
from datasets.config import DataConfig
from datasets.reader import ParquetStream, dropped_rows_per_epoch, steps_per_epoch, train_loader
from datasets.schema import DataError
from tests.datasets.helpers import make_cfg, small_table
from tests.datasets.test_reader import assert_same_batches, digest, tags, take, three_files, valid_tags

ROWS = 36  # tags 0..35 (the ``price`` column is the row id)


def write_groups(path: Path, start: int, sizes: Sequence[int]) -> str:
    """Rows ``start ..`` of :func:`small_table` with one row group of each of ``sizes`` rows."""
    table = small_table(sum(sizes), start)
    with pq.ParquetWriter(path, table.schema) as writer:
        offset = 0
        for n in sizes:
            writer.write_table(table.slice(offset, n), row_group_size=n)
            offset += n
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(len(sizes))] == list(sizes)
    return str(path)


@pytest.fixture
def uneven(tmp_path: Path) -> list[str]:
    """36 rows in 2 files with row groups of 7, 13 | 5, 11 rows."""
    return [write_groups(tmp_path / "a.parquet", 0, [7, 13]), write_groups(tmp_path / "b.parquet", 20, [5, 11])]


def epoch_cfg(
    paths: list[str], batch_size: int, drop_last: bool = False, num_workers: int = 0, seed: int = 3
) -> DataConfig:
    cfg = make_cfg(paths, batch_size=batch_size, num_workers=num_workers, seed=seed)
    cfg.drop_last = drop_last
    return cfg


def rank_stream(cfg: DataConfig, rank: int, world_size: int, epochs: int, start_step: int = 0) -> list[Batch]:
    """One rank's whole finite stream, workers emulated in one process in the DataLoader's round robin
    (batch k from worker k % W); checks that every worker ends exactly when the stream does."""
    ds = ParquetStream(cfg, cfg.train_paths, rank, world_size, train=True, start_step=start_step, epochs=epochs)
    workers = max(cfg.num_workers, 1)
    streams = [ds.reader_batches(w, workers) for w in range(workers)]
    out: list[Batch] = []
    while True:
        b = next(streams[len(out) % workers], None)
        if b is None:
            break
        out.append(b)
    assert all(next(s, None) is None for s in streams), "a worker has batches left after the stream ended"
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [4, 5, 6])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_epoch(
    uneven: list[str], world_size: int, batch_size: int, drop_last: bool, num_workers: int
) -> None:
    cfg = epoch_cfg(uneven, batch_size, drop_last, num_workers)
    steps = steps_per_epoch(cfg, world_size)
    per_step = world_size * batch_size
    assert steps == (ROWS // per_step if drop_last else -(-ROWS // per_step))
    dropped = dropped_rows_per_epoch(cfg, world_size)
    assert dropped == (ROWS - steps * per_step if drop_last else 0)
    streams = [rank_stream(cfg, rank, world_size, epochs=2) for rank in range(world_size)]
    assert [len(s) for s in streams] == [2 * steps] * world_size  # every rank takes the same steps
    seen: list[list[int]] = [[], []]  # valid row ids per epoch, in stream order (rank by rank)
    unread: list[set[int]] = []
    for stream in streams:
        for k, b in enumerate(stream):
            assert b.batch_size == batch_size and b.sparse_features.stride() == batch_size
            pad = ~b.valid
            assert b.weights[pad].tolist() == [0.0] * int(pad.sum())
            assert b.weights[b.valid].tolist() == [1.0] * int(b.valid.sum())
            assert b.id_fixes.tolist() == [0, 0, 0]
            assert set(tags(b)) <= set(range(ROWS))  # padding copies real rows
            seen[k // steps] += valid_tags(b)
    for epoch in range(2):
        assert len(seen[epoch]) == len(set(seen[epoch])) == ROWS - dropped  # no row twice
        unread.append(set(range(ROWS)) - set(seen[epoch]))
        assert len(unread[epoch]) == dropped
    padding = sum(int((~b.valid).sum()) for s in streams for b in s)
    assert padding == 2 * (steps * per_step - (ROWS - dropped))
    assert (padding == 0) == (drop_last or ROWS % per_step == 0)
    assert seen[0] != seen[1]  # reshuffled every epoch
    if dropped:
        assert unread[0] != unread[1]  # other rows are skipped every epoch


def test_issue_layout_every_row_once(tmp_path: Path) -> None:
    """The layout of the issue scaled by 1/1024: row groups of 64, 64, 39 rows, 2 ranks, one row per batch.
    84 steps per rank then read every row once (one padding row); the infinite stream, which hands whole row
    groups to ranks, re-reads rows on one rank and never reaches some of the other's in the same steps."""
    path = write_groups(tmp_path / "issue.parquet", 0, [64, 64, 39])
    cfg = epoch_cfg([path], batch_size=1)
    assert steps_per_epoch(cfg, 2) == 84
    exact = [valid_tags(b) for rank in range(2) for b in rank_stream(cfg, rank, 2, epochs=1)]
    assert sorted(t for ts in exact for t in ts) == list(range(167))
    infinite = [t for rank in range(2) for b in take(train_loader(cfg, rank, 2), 84) for t in tags(b)]
    assert len(set(infinite)) < 167


def test_orders_differ_across_ranks_and_seeds(uneven: list[str]) -> None:
    cfg = epoch_cfg(uneven, batch_size=4)
    first = [tags(b) for b in rank_stream(cfg, 0, 2, epochs=1)]
    cfg.seed = 4
    assert [tags(b) for b in rank_stream(cfg, 0, 2, epochs=1)] != first
    cfg.shuffle = False  # file order, every epoch the same
    for rank in range(2):  # each rank holds its half of the file order, in every epoch
        half = list(range(rank * ROWS // 2, (rank + 1) * ROWS // 2))
        assert [t for b in rank_stream(cfg, rank, 2, epochs=2) for t in valid_tags(b)] == half * 2


def test_balanced_by_rows_not_row_groups(tmp_path: Path) -> None:
    """One row group of 30 and one of 2: both ranks read 16 rows per epoch."""
    path = write_groups(tmp_path / "skew.parquet", 0, [30, 2])
    cfg = epoch_cfg([path], batch_size=4)
    for rank in range(2):
        stream = rank_stream(cfg, rank, 2, epochs=1)
        assert len(stream) == 4 and sum(len(valid_tags(b)) for b in stream) == 16


def test_fewer_rows_than_ranks(tmp_path: Path) -> None:
    """2 rows, 3 ranks, batch 2: one step per epoch; rank 2 yields only padding (copies of rank 1's row)."""
    path = write_groups(tmp_path / "two.parquet", 0, [2])
    cfg = epoch_cfg([path], batch_size=2, num_workers=2)
    streams = [rank_stream(cfg, rank, 3, epochs=2) for rank in range(3)]
    assert [len(s) for s in streams] == [2, 2, 2]
    assert [[len(valid_tags(b)) for b in s] for s in streams] == [[1, 1], [1, 1], [0, 0]]
    for epoch in range(2):
        assert sorted(valid_tags(streams[0][epoch]) + valid_tags(streams[1][epoch])) == [0, 1]
        assert tags(streams[2][epoch]) == [valid_tags(streams[1][epoch])[0]] * 2


# ------------------------------------------------------------------------------------------------ resume


def resume_points(steps: int) -> list[int]:
    """Mid epoch 1, the epoch boundary, mid epoch 2, the last batch and the end of a 2-epoch stream."""
    return [steps // 2, steps, steps + steps // 2 + 1, 2 * steps - 1, 2 * steps]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_equals_tail_of_fresh_stream(
    uneven: list[str], world_size: int, drop_last: bool, num_workers: int
) -> None:
    cfg = epoch_cfg(uneven, batch_size=5, drop_last=drop_last, num_workers=num_workers)
    steps = steps_per_epoch(cfg, world_size)
    assert steps >= 2
    for rank in range(world_size):
        fresh = rank_stream(cfg, rank, world_size, epochs=2)
        for start_step in resume_points(steps):
            resumed = rank_stream(cfg, rank, world_size, epochs=2, start_step=start_step)
            assert_same_batches(resumed, fresh[start_step:])


def test_resume_reads_only_what_it_yields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 row groups of 3 rows; resuming at the last batch reads only the row groups of that batch."""
    path = write_groups(tmp_path / "many.parquet", 0, [3] * 12)
    cfg = epoch_cfg([path], batch_size=4)
    steps = steps_per_epoch(cfg, 1)
    fresh = rank_stream(cfg, 0, 1, epochs=2)
    reads = []
    original = ParquetStream._read_unit

    def counting(self: ParquetStream, unit: object) -> object:
        reads.append(unit)
        return original(self, unit)

    monkeypatch.setattr(ParquetStream, "_read_unit", counting)
    (last,) = rank_stream(cfg, 0, 1, epochs=2, start_step=2 * steps - 1)
    assert_same_batches([last], fresh[-1:])
    assert 1 <= len(reads) <= 2  # 4 rows span at most 2 row groups of 3
    reads.clear()
    assert_same_batches(rank_stream(cfg, 0, 1, epochs=2, start_step=steps + 4), fresh[steps + 4 :])
    assert len(reads) <= 12 - 4  # epoch 1 not read at all, 16 of epoch 2's 36 rows skipped


def test_worker_processes_match_the_round_robin(uneven: list[str]) -> None:
    """Real DataLoader workers (3 epochs of 5 batches: the workers yield 8 and 7) give the emulated stream,
    fresh and resumed."""
    cfg = epoch_cfg(uneven, batch_size=4, num_workers=2)
    assert steps_per_epoch(cfg, 2) == 5
    expected = rank_stream(cfg, 1, 2, epochs=3)
    assert_same_batches(list(train_loader(cfg, 1, 2, epochs=3)), expected)
    assert_same_batches(list(train_loader(cfg, 1, 2, start_step=7, epochs=3)), expected[7:])


# ------------------------------------------------------------------------------------ config and errors


def test_infinite_stream_ignores_drop_last(write_parquet: Callable[..., str]) -> None:
    cfg = make_cfg(three_files(write_parquet), batch_size=4, seed=5)
    cfg.drop_last = True
    assert digest(take(train_loader(cfg, 0, 1), 30)) == "142c19a7ad1d9bb6"  # the pinned infinite stream


def test_no_step_per_epoch_is_an_error(uneven: list[str]) -> None:
    cfg = epoch_cfg(uneven, batch_size=20, drop_last=True)  # 36 rows < 2 x 20
    assert steps_per_epoch(cfg, 2) == 0 and dropped_rows_per_epoch(cfg, 2) == 36
    with pytest.raises(DataError, match=r"36 rows give no step per epoch with world_size x batch_size = 2 x 20"):
        train_loader(cfg, 0, 2, epochs=1)
    cfg.drop_last = False
    assert steps_per_epoch(cfg, 2) == 1
    assert len(list(train_loader(cfg, 0, 2, epochs=1))) == 1


def test_bad_epochs(uneven: list[str]) -> None:
    cfg = epoch_cfg(uneven, batch_size=4)
    with pytest.raises(ValueError, match="epochs must be None or >= 1"):
        train_loader(cfg, 0, 1, epochs=0)
    with pytest.raises(ValueError, match="only used for training"):
        ParquetStream(cfg, cfg.eval_paths, 0, 1, train=False, epochs=1)


def test_exact_epoch_batches_are_all_finite_tensors(uneven: list[str]) -> None:
    cfg = epoch_cfg(uneven, batch_size=5)
    for b in rank_stream(cfg, 1, 2, epochs=1):
        assert torch.isfinite(b.float_features).all() and torch.isfinite(b.float_sequences.values()).all()
        assert b.sparse_features["hist_item_id"].lengths().tolist() == [t % 4 for t in tags(b)]
