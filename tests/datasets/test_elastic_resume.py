"""Tests of the data position carried in rows across world sizes (elastic resume of exact epochs): a stream of
``W`` ranks stopped after ``k`` steps and continued on ``W'`` ranks from :func:`datasets.epochs.stream_after`
reads, in each epoch, every row exactly once over both parts (the rows ``drop_last`` skips excepted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets.config import DataConfig
from datasets.epochs import EpochLayout, StreamStart, merge_intervals, stream_after, stream_layouts, subtract_intervals
from datasets.reader import ParquetStream, count_rows, stream_steps
from tests.datasets.test_epochs import ROWS, epoch_cfg, uneven, write_groups  # noqa: F401 (fixture)
from tests.datasets.test_reader import valid_tags

EPOCHS = 2


def stream(cfg: DataConfig, rank: int, world: int, start: StreamStart, start_step: int = 0) -> list:
    ds = ParquetStream(cfg, cfg.train_paths, rank, world, True, start_step=start_step, epochs=EPOCHS,
                       stream_start=start)
    workers = max(cfg.num_workers, 1)
    its = [ds.reader_batches(w, workers) for w in range(workers)]
    out = []
    while (b := next(its[(len(out)) % workers], None)) is not None:
        out.append(b)
    assert all(next(i, None) is None for i in its)
    return out


def layouts(cfg: DataConfig, world: int, start: StreamStart) -> list[tuple[int, EpochLayout]]:
    return stream_layouts(count_rows(cfg.train_paths), world, max(cfg.num_workers, 1), cfg.batch_size,
                          cfg.drop_last, EPOCHS, start)


def per_epoch_rows(cfg: DataConfig, world: int, start: StreamStart, first: int, count: int) -> dict[int, list[int]]:
    """Valid row ids read in steps ``first .. first + count - 1`` of a ``world``-rank stream, by epoch."""
    lay = layouts(cfg, world, start)
    out: dict[int, list[int]] = {}
    for rank in range(world):
        batches = stream(cfg, rank, world, start, first)[:count]
        for k, b in enumerate(batches, start=first):
            epoch = max(e for e, la in lay if la.first_step <= k)
            out.setdefault(epoch, []).extend(valid_tags(b))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_resized_resume_reads_every_row_once_per_epoch(
    uneven: list[str], old: int, new: int, drop_last: bool, num_workers: int  # noqa: F811
) -> None:
    cfg = epoch_cfg(uneven, 4, drop_last, num_workers)
    total_old = stream_steps(cfg, old, EPOCHS)
    for k in sorted({1, 2, total_old // 2 - 1, total_old // 2, total_old // 2 + 1, total_old - 1}):
        before = per_epoch_rows(cfg, old, StreamStart(), 0, k)
        start = stream_after(layouts(cfg, old, StreamStart()), k, EPOCHS)
        rest = stream_steps(cfg, new, EPOCHS, start)
        after = per_epoch_rows(cfg, new, start, 0, rest)
        for epoch in range(EPOCHS):
            rows = before.get(epoch, []) + after.get(epoch, [])
            assert len(rows) == len(set(rows)), f"k={k} epoch {epoch}: a row read twice"
            if not drop_last:
                assert sorted(rows) == list(range(ROWS)), f"k={k} epoch {epoch}: rows missing"
            else:  # whole epochs skip ROWS mod G; the interrupted one at most the new world's remainder too
                assert ROWS - len(rows) < old * cfg.batch_size + new * cfg.batch_size


def test_same_world_resume_is_the_tail_of_the_stream(uneven: list[str]) -> None:  # noqa: F811
    """stream_after + a fresh layout on the same world size read the same rows as resuming by step count."""
    cfg = epoch_cfg(uneven, 5, False, 0)
    for k in (1, 3, 5):
        start = stream_after(layouts(cfg, 2, StreamStart()), k, EPOCHS)
        by_rows = per_epoch_rows(cfg, 2, start, 0, stream_steps(cfg, 2, EPOCHS, start))
        by_step = per_epoch_rows(cfg, 2, StreamStart(), k, stream_steps(cfg, 2, EPOCHS) - k)
        assert {e: sorted(v) for e, v in by_rows.items()} == {e: sorted(v) for e, v in by_step.items()}


def test_resume_twice_across_three_world_sizes(uneven: list[str]) -> None:  # noqa: F811
    """2 ranks -> 3 ranks mid-epoch -> 1 rank mid-epoch: still every row once per epoch."""
    cfg = epoch_cfg(uneven, 4, False, 0)
    s0 = StreamStart()
    a = per_epoch_rows(cfg, 2, s0, 0, 2)
    s1 = stream_after(layouts(cfg, 2, s0), 2, EPOCHS)
    assert s1.epoch == 0 and s1.remaining is not None
    b = per_epoch_rows(cfg, 3, s1, 0, 1)
    s2 = stream_after(layouts(cfg, 3, s1), 1, EPOCHS)
    c = per_epoch_rows(cfg, 1, s2, 0, stream_steps(cfg, 1, EPOCHS, s2))
    for epoch in range(EPOCHS):
        rows = a.get(epoch, []) + b.get(epoch, []) + c.get(epoch, [])
        assert sorted(rows) == list(range(ROWS))


def test_stream_after_boundaries(uneven: list[str]) -> None:  # noqa: F811
    cfg = epoch_cfg(uneven, 6, False, 0)
    lay = layouts(cfg, 2, StreamStart())
    spe = lay[0][1].steps
    assert stream_after(lay, 0, EPOCHS) == StreamStart(0, None)
    assert stream_after(lay, spe, EPOCHS) == StreamStart(1, None)  # an epoch boundary: the next epoch, whole
    assert stream_after(lay, EPOCHS * spe, EPOCHS) == StreamStart(EPOCHS)
    mid = stream_after(lay, 1, EPOCHS)  # each rank read its first 6 positions of 18
    assert mid == StreamStart(0, ((6, 18), (24, 36)))
    assert StreamStart.from_json(mid.to_json()) == mid


def test_interval_helpers() -> None:
    assert merge_intervals([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == ((0, 3), (5, 9))
    assert subtract_intervals([(0, 10), (20, 30)], [(2, 4), (8, 22), (25, 26)]) == ((0, 2), (4, 8), (22, 25), (26, 30))
    lay = EpochLayout(5, 1, 1, 5, False, 0, ((3, 5), (10, 13)))
    assert lay.real(0, 5) == [(3, 5), (10, 13)] and lay.real(1, 3) == [(4, 5), (10, 11)]


def test_stream_start_past_the_files(tmp_path: Path) -> None:
    path = write_groups(tmp_path / "a.parquet", 0, [5])
    cfg = epoch_cfg([path], 2)
    with pytest.raises(ValueError, match="names position 9, the training files have 5 rows"):
        ParquetStream(cfg, cfg.train_paths, 0, 1, True, epochs=1, stream_start=StreamStart(0, ((3, 10),)))
    with pytest.raises(ValueError, match="stream_start needs exact epochs"):
        ParquetStream(cfg, cfg.train_paths, 0, 1, True, stream_start=StreamStart())
