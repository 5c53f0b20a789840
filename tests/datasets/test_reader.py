"""Tests of datasets.reader: exact batch contents, splits across ranks and workers, the deterministic and
resumable training stream, truncation, padding, and one clear DataError per kind of bad input."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from datasets.batch import Batch
from datasets.reader import ParquetStream, count_rows, eval_batches, eval_loader, train_loader
from datasets.schema import DataError, IdPolicy
from tests.datasets.helpers import make_cfg, small_schema, small_table


def tags(batch: Batch) -> list[int]:
    """Row tags (the ``price`` column) of a batch's rows."""
    return [int(x) for x in batch.float_features[:, 0].tolist()]


def valid_tags(batch: Batch) -> list[int]:
    return [t for t, v in zip(tags(batch), batch.valid.tolist()) if v]


def take(stream: Iterable[Batch], n: int) -> list[Batch]:
    return list(itertools.islice(iter(stream), n))


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
        assert torch.equal(x.float_sequences.values(), y.float_sequences.values())
        for name in ("float_features", "labels", "group_ids", "weights", "valid", "id_fixes"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def three_files(write_parquet: Callable[..., str]) -> list[str]:
    """50 rows (tags 0..49) in 3 files with row groups of 5 rows: 11 units."""
    return [
        write_parquet(small_table(17, 0), "a.parquet", 5),
        write_parquet(small_table(13, 17), "b.parquet", 5),
        write_parquet(small_table(20, 30), "c.parquet", 5),
    ]


# ------------------------------------------------------------------------------------ batch contents


def handwritten(write_parquet: Callable[..., str]) -> str:
    return write_parquet(
        pa.table(
            {
                "user_id": pa.array([1, 2, 3], pa.int64()),
                "item_id": pa.array([10, 11, 19], pa.int32()),  # int32 is accepted, read as int64
                "hist_item_id": pa.array([[1, 2, 3], [], [4]], pa.list_(pa.int64())),
                "hist_time_delta": pa.array([[30.0, 20.0, 10.0], [], [5.0]], pa.list_(pa.float64())),
                "price": pa.array([0.5, 1.5, 2.5], pa.float64()),
                "label": pa.array([True, False, True]),
                "w": pa.array([1.0, 2.0, 0.5], pa.float32()),
            }
        )
    )


def test_batch_contents_exact(write_parquet: Callable[..., str]) -> None:
    cfg = make_cfg([handwritten(write_parquet)], schema=small_schema(weight=True), batch_size=3, shuffle=False)
    (b,) = list(eval_loader(cfg, rank=0, world_size=1))
    kjt = b.sparse_features
    assert kjt.keys() == ["user_id", "item_id", "hist_item_id"]
    assert kjt.stride() == 3
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1, 3, 0, 1]
    assert kjt.values().tolist() == [1, 2, 3, 10, 11, 19, 1, 2, 3, 4]
    assert kjt.values().dtype == torch.int64
    assert kjt["hist_item_id"].to_padded_dense(3).tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0]]
    fs = b.float_sequences
    assert fs.keys() == ["hist_time_delta"]
    assert fs.lengths().tolist() == [3, 0, 1]
    assert fs.values().dtype == torch.float32
    assert fs.values().tolist() == [30.0, 20.0, 10.0, 5.0]
    assert b.float_features.dtype == torch.float32 and b.float_features.tolist() == [[0.5], [1.5], [2.5]]
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == [[1.0], [0.0], [1.0]]
    assert b.group_ids.dtype == torch.int64 and b.group_ids.tolist() == [1, 2, 3]
    assert b.weights.tolist() == [1.0, 2.0, 0.5]
    assert b.valid.tolist() == [True, True, True]
    assert b.id_fixes.tolist() == [0, 0, 0]
    moved = b.to(torch.device("cpu"))
    assert moved.sparse_features.values().tolist() == kjt.values().tolist()


def test_no_float_sequences_gives_empty_kjt_that_moves(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(6))
    cfg = make_cfg([path], schema=small_schema(float_sequences=False), batch_size=3, shuffle=False)
    b = next(iter(eval_loader(cfg, 0, 1)))
    assert b.float_sequences.keys() == []
    assert b.float_sequences.stride() == 3
    moved = b.to(torch.device("cpu"))
    assert moved.float_sequences.keys() == [] and moved.float_sequences.stride() == 3
    assert b.weights.tolist() == [1.0, 1.0, 1.0]  # no weight column: ones


def test_truncation_keeps_most_recent_items(write_parquet: Callable[..., str]) -> None:
    cfg = make_cfg([handwritten(write_parquet)], schema=small_schema(weight=True), batch_size=3, shuffle=False)
    cfg.max_sequence_length = 2
    (b,) = list(eval_loader(cfg, 0, 1))
    hist = b.sparse_features["hist_item_id"]
    assert hist.lengths().tolist() == [2, 0, 1]
    assert hist.values().tolist() == [2, 3, 4]  # the tail: oldest behaviour dropped
    assert b.float_sequences["hist_time_delta"].values().tolist() == [20.0, 10.0, 5.0]
    assert b.sparse_features["item_id"].values().tolist() == [10, 11, 19]  # scalars untouched


def test_count_rows_from_metadata(write_parquet: Callable[..., str], tmp_path: Path) -> None:
    three_files(write_parquet)
    assert count_rows([str(tmp_path / "*.parquet")]) == 50


# ------------------------------------------------------------------------------------------- splits


def test_eval_two_ranks_two_workers_every_row_once_with_padding(write_parquet: Callable[..., str]) -> None:
    paths = three_files(write_parquet)
    cfg = make_cfg(paths, batch_size=4, num_workers=2)
    seen: list[int] = []
    per_rank = []
    for rank in range(2):
        ds = ParquetStream(cfg, cfg.eval_paths, rank, 2, train=False)
        n = 0
        for worker in range(2):
            batches = list(ds.reader_batches(worker, 2))
            assert len(batches) == ds.eval_batches_per_reader()
            for b in batches:
                assert b.batch_size == 4 and b.sparse_features.stride() == 4
                pad = ~b.valid
                assert b.weights[pad].tolist() == [0.0] * int(pad.sum())
                assert b.id_fixes.tolist() == [0, 0, 0]
                assert set(tags(b)) <= set(range(50))  # padding copies real rows
                seen += valid_tags(b)
            valid = torch.cat([b.valid for b in batches])
            assert not valid[int(valid.sum()):].any()  # real rows first, padding only at the end
            n += len(batches)
        per_rank.append(n)
    assert sorted(seen) == list(range(50))
    assert per_rank[0] == per_rank[1]  # ranks stay in lockstep
    assert 2 * per_rank[0] * 4 > 50  # so padding rows were produced and checked above


def test_eval_loader_with_worker_processes(write_parquet: Callable[..., str]) -> None:
    paths = three_files(write_parquet)
    cfg = make_cfg(paths, batch_size=8, num_workers=2)
    seen = [t for b in eval_loader(cfg, 0, 1) for t in valid_tags(b)]
    assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_is_what_every_rank_yields(
    write_parquet: Callable[..., str], world_size: int, num_workers: int
) -> None:
    cfg = make_cfg(three_files(write_parquet), batch_size=3, num_workers=num_workers)
    workers = max(num_workers, 1)
    expected = eval_batches(cfg, world_size)
    for rank in range(world_size):
        ds = ParquetStream(cfg, cfg.eval_paths, rank, world_size, train=False)
        assert sum(len(list(ds.reader_batches(w, workers))) for w in range(workers)) == expected
    assert expected >= -(-50 // (3 * world_size))  # at least enough to hold every row once
    if (world_size, num_workers) == (2, 2):  # real worker processes yield the same count
        assert len(list(eval_loader(cfg, 1, world_size))) == expected
    with pytest.raises(ValueError, match="unknown sequence groups"):
        eval_batches(cfg, world_size, sequence_caps={"candidates": 1})


def test_row_groups_subdivided_when_fewer_units_than_readers(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(10))  # one row group, 4 readers
    cfg = make_cfg([path], batch_size=4, num_workers=2)
    seen = []
    for rank in range(2):
        ds = ParquetStream(cfg, cfg.eval_paths, rank, 2, train=False)
        for worker in range(2):
            rows = [t for b in ds.reader_batches(worker, 2) for t in valid_tags(b)]
            assert rows, "every reader gets rows"
            seen += rows
    assert sorted(seen) == list(range(10))


def test_fewer_rows_than_readers_is_an_error(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(3))
    cfg = make_cfg([path], num_workers=2)
    with pytest.raises(DataError, match=r"3 rows cannot be split across 4 readers"):
        train_loader(cfg, 0, 2)


def test_train_ranks_cover_an_epoch_disjointly(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(24), row_group_size=6)  # 4 units, 2 per rank
    cfg = make_cfg([path], batch_size=4)
    first_epoch = []
    for rank in range(2):
        first_epoch += [t for b in take(train_loader(cfg, rank, 2), 3) for t in tags(b)]
    assert sorted(first_epoch) == list(range(24))


# -------------------------------------------------------------------------------------- train stream


def test_train_stream_deterministic_and_shuffled_per_epoch(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(24), row_group_size=6)
    cfg = make_cfg([path], batch_size=4, seed=7)
    a, b = take(train_loader(cfg, 0, 1), 12), take(train_loader(cfg, 0, 1), 12)
    assert_same_batches(a, b)
    assert all(x.batch_size == 4 and bool(x.valid.all()) for x in a)
    epoch0 = [t for x in a[:6] for t in tags(x)]
    epoch1 = [t for x in a[6:] for t in tags(x)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))  # each epoch: every row once
    assert epoch0 != epoch1 and epoch0 != list(range(24))  # reshuffled every epoch
    cfg.seed = 8
    assert [tags(x) for x in take(train_loader(cfg, 0, 1), 6)] != [tags(x) for x in a[:6]]
    cfg.shuffle = False
    assert [t for x in take(train_loader(cfg, 0, 1), 6) for t in tags(x)] == list(range(24))


@pytest.mark.parametrize("start_step", [1, 4, 7, 13])
def test_start_step_equals_dropping_batches(write_parquet: Callable[..., str], start_step: int) -> None:
    path = write_parquet(small_table(22), row_group_size=6)  # units of 6, 6, 6, 4 rows; batches span units
    cfg = make_cfg([path], batch_size=4, seed=3)
    fresh = take(train_loader(cfg, 0, 1), 16)
    resumed = take(train_loader(cfg, 0, 1, start_step=start_step), 16 - start_step)
    assert_same_batches(resumed, fresh[start_step:])


def test_start_step_skips_units_without_reading_them(
    write_parquet: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_parquet(small_table(24), row_group_size=6)
    cfg = make_cfg([path], batch_size=6, seed=1)
    fresh = take(train_loader(cfg, 0, 1), 8)
    reads = []
    original = ParquetStream._read_unit

    def counting(self: ParquetStream, unit: object) -> object:
        reads.append(unit)
        return original(self, unit)

    monkeypatch.setattr(ParquetStream, "_read_unit", counting)
    resumed = next(iter(train_loader(cfg, 0, 1, start_step=7)))  # 1 epoch (4 units) + 3 units skipped
    assert len(reads) == 1
    assert_same_batches([resumed], [fresh[7]])


def test_start_step_with_worker_processes(write_parquet: Callable[..., str]) -> None:
    paths = three_files(write_parquet)
    cfg = make_cfg(paths, batch_size=4, num_workers=2, seed=5)
    fresh = take(train_loader(cfg, 0, 1), 10)
    assert_same_batches(take(train_loader(cfg, 0, 1, start_step=3), 7), fresh[3:])


def digest(batches: Iterable[Batch]) -> str:
    """A short hash of every tensor of the batches (KJT keys, values and lengths included)."""
    h = hashlib.sha256()
    for b in batches:
        for kjt in (b.sparse_features, b.float_sequences, b.sequence_labels):
            h.update(repr(kjt.keys()).encode())
            h.update(kjt.values().numpy().tobytes())
            h.update(kjt.lengths().numpy().tobytes())
        for name in ("float_features", "labels", "group_ids", "weights", "valid", "id_fixes"):
            h.update(getattr(b, name).numpy().tobytes())
    return h.hexdigest()[:16]


# Digests of the first 30 batches of every rank of the infinite stream (epochs=None), computed with the reader
# as it was before exact epochs existed: the infinite stream (what `make train` trains on) must not change.
PINNED = [
    ("three", dict(batch_size=4, seed=5), 1, None, ["142c19a7ad1d9bb6"]),
    ("three", dict(batch_size=4, seed=5), 2, None, ["960713fc23a0bfc0", "46e253b5258bb7ea"]),
    ("three", dict(batch_size=3, seed=2, num_workers=2), 2, None, ["11d3239a12393ba8", "96cba6d1cb12dfa3"]),
    ("three", dict(batch_size=4, shuffle=False), 3, None, ["a3bfde23256a3ad4", "37cc5648e3b28d41", "2d25339eaa020db0"]),
    ("three", dict(batch_size=5, seed=9, max_sequence_length=2), 2, {"history": 1},
     ["a72cb8c45b2f2d40", "c71cea06e1e3eaec"]),
    ("single", dict(batch_size=3, seed=1, num_workers=2), 2, None, ["6eb02ea85573c298", "f819d40c7501d23e"]),
]


@pytest.mark.parametrize("layout, kw, world_size, caps, expected", PINNED)
def test_infinite_stream_is_pinned(
    write_parquet: Callable[..., str], layout: str, kw: dict, world_size: int, caps: dict, expected: list[str]
) -> None:
    paths = three_files(write_parquet) if layout == "three" else [write_parquet(small_table(10), "s.parquet")]
    cfg = make_cfg(paths, **kw)
    workers = max(cfg.num_workers, 1)
    got = []
    for rank in range(world_size):
        ds = ParquetStream(cfg, cfg.train_paths, rank, world_size, train=True, sequence_caps=caps)
        streams = [ds.reader_batches(k, workers) for k in range(workers)]
        got.append(digest(next(streams[k % workers]) for k in range(30)))  # the DataLoader's round robin
    assert got == expected


def test_infinite_loader_with_worker_processes_is_pinned(write_parquet: Callable[..., str]) -> None:
    cfg = make_cfg(three_files(write_parquet), batch_size=4, seed=5, num_workers=2)
    assert digest(take(train_loader(cfg, 1, 2), 12)) == "664632d8c4ca62c3"
    assert digest(take(train_loader(cfg, 1, 2, start_step=5), 12)) == "004d60b38de05c1f"


# ----------------------------------------------------------------------------------------- bad input


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot open as a parquet file"):
        train_loader(make_cfg([str(bad)]), 0, 1)
    with pytest.raises(DataError, match=r"nothing-\*\.parquet: the pattern matches no file"):
        eval_loader(make_cfg([str(tmp_path / "nothing-*.parquet")]), 0, 1)


def test_missing_column(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(8).drop_columns(["label"]), "nolabel.parquet")
    with pytest.raises(DataError, match=r"nolabel\.parquet: missing column 'label' \(expected arrow type float"):
        train_loader(make_cfg([path]), 0, 1)


def test_mistyped_column(write_parquet: Callable[..., str]) -> None:
    t = small_table(8)
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pc.cast(t["item_id"], pa.float64()))
    path = write_parquet(t, "typed.parquet")
    with pytest.raises(DataError, match=r"typed\.parquet: column 'item_id' has arrow type double, expected int64 or int32"):
        eval_loader(make_cfg([path]), 0, 1)


def with_column(t: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, type_))


def with_history(t: pa.Table, hist: list) -> pa.Table:
    """Replaces hist_item_id, and hist_time_delta with lists of the same lengths (one aligned group)."""
    deltas = [[100.0 * (len(h) - k) for k in range(len(h))] for h in hist]
    t = with_column(t, "hist_item_id", hist, pa.list_(pa.int64()))
    return with_column(t, "hist_time_delta", deltas, pa.list_(pa.float32()))


def test_out_of_range_id_names_file_row_group_row_column(write_parquet: Callable[..., str]) -> None:
    t = small_table(10)
    items = t["item_id"].to_pylist()
    items[7] = 25
    path = write_parquet(with_column(t, "item_id", items, pa.int64()), "ids.parquet", row_group_size=5)
    with pytest.raises(DataError) as err:
        list(eval_loader(make_cfg([path], shuffle=False), 0, 1))
    msg = str(err.value)
    for part in ("ids.parquet", "row group 1", "row 7 (row index within the file; row 2 of the row group)",
                 "column 'item_id'", "id 25", "[0, 20)", "id_policy=hash", "id_policy=clip"):
        assert part in msg, (part, msg)


def test_out_of_range_sequence_id_names_list_position(write_parquet: Callable[..., str]) -> None:
    t = small_table(4)
    path = write_parquet(with_history(t, [[], [1], [2, -1], []]), "seq.parquet")
    with pytest.raises(DataError, match=r"seq\.parquet: row group 0, row 2 .* column 'hist_item_id': id -1 \(list position 1\)"):
        next(iter(train_loader(make_cfg([path], shuffle=False, batch_size=2), 0, 1)))


def fix_table() -> pa.Table:
    t = small_table(3)
    t = with_column(t, "item_id", [21, 5, -3], pa.int64())
    return with_history(t, [[-1, 23, 4], [40], []])


@pytest.mark.parametrize(
    "policy, items, hist",
    [
        (IdPolicy.hash, [1, 5, 17], [19, 3, 4, 0]),  # Python modulo: -3 % 20 = 17, -1 % 20 = 19
        (IdPolicy.clip, [19, 5, 0], [0, 19, 4, 19]),
    ],
)
def test_hash_and_clip_rewrite_and_count(write_parquet: Callable[..., str], policy: IdPolicy, items: list, hist: list) -> None:
    path = write_parquet(fix_table())
    (b,) = list(eval_loader(make_cfg([path], batch_size=3, id_policy=policy, shuffle=False), 0, 1))
    assert b.sparse_features["item_id"].values().tolist() == items
    assert b.sparse_features["hist_item_id"].values().tolist() == hist
    assert b.id_fixes.tolist() == [0, 2, 3]
    cfg = make_cfg([path], batch_size=3, id_policy=policy, shuffle=False, max_sequence_length=1)
    (b,) = list(eval_loader(cfg, 0, 1))
    assert b.sparse_features["hist_item_id"].lengths().tolist() == [1, 1, 0]
    assert b.id_fixes.tolist() == [0, 2, 1]  # only the rewritten ids that reach the batch count


def test_null_id(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(with_column(small_table(5), "user_id", [1, 2, 3, None, 5], pa.int64()), "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls\.parquet: row group 0, row 3 .* column 'user_id': null value"):
        next(iter(eval_loader(make_cfg([path]), 0, 1)))
    path = write_parquet(with_history(small_table(3), [[1], [2, None], []]), "n2.parquet")
    with pytest.raises(DataError, match=r"n2\.parquet: row group 0, row 1 .* column 'hist_item_id': null element at position 1"):
        next(iter(eval_loader(make_cfg([path]), 0, 1)))


@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (2.0, "2.0")])
def test_bad_label(write_parquet: Callable[..., str], bad: float, shown: str) -> None:
    labels = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    labels[4] = bad
    path = write_parquet(with_column(small_table(6), "label", labels, pa.float32()), "labels.parquet", row_group_size=3)
    with pytest.raises(DataError) as err:
        next(iter(eval_loader(make_cfg([path], batch_size=6), 0, 1)))
    msg = str(err.value)
    for part in ("labels.parquet", "row group 1", "row 4", "column 'label'", f"label value {shown}", "expected 0 or 1"):
        assert part in msg, (part, msg)


def test_ids_validated_in_every_unit_before_batching(write_parquet: Callable[..., str]) -> None:
    """A bad id in the second unit fails the first batch that would contain it, never a KJT."""
    t = small_table(8)
    items = t["item_id"].to_pylist()
    items[6] = 99
    path = write_parquet(with_column(t, "item_id", items, pa.int64()), row_group_size=4)
    stream = iter(eval_loader(make_cfg([path], batch_size=4, shuffle=False), 0, 1))
    assert tags(next(stream)) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="id 99"):
        next(stream)


def test_hashed_features_map_raw_64_bit_ids_into_their_table(write_parquet: Callable[..., str]) -> None:
    """``mapping: hash`` on the item table: every raw id (any int64) lands on splitmix64(id) mod rows, the
    same row from the target and the history; the other features keep the range check."""
    import numpy as np

    from datasets.schema import IdMapping, hash_ids

    schema = small_schema()
    for f in schema.id_features:
        if f.table == "item":
            f.mapping = IdMapping.hash
    raw = [2**62 + 7, -5, 123456789012345]
    t = with_column(small_table(3), "item_id", raw, pa.int64())
    t = with_history(t, [[2**62 + 7, 0], [2**40], []])
    (b,) = list(eval_loader(make_cfg([write_parquet(t)], schema=schema, batch_size=3, shuffle=False), 0, 1))
    items = b.sparse_features["item_id"].values().tolist()
    assert items == hash_ids(np.array(raw, dtype=np.int64), 20).tolist() and all(0 <= i < 20 for i in items)
    hist = b.sparse_features["hist_item_id"].values().tolist()
    assert hist[0] == items[0]  # the same raw id, the same row, from either feature
    assert b.id_fixes.tolist() == [0, 0, 0]  # hashing is the mapping, not a fix
    # Structured ids spread: a plain modulo would put every multiple of 20 on row 0.
    rows = hash_ids(np.arange(0, 20 * 2000, 20, dtype=np.int64), 20)
    assert np.bincount(rows, minlength=20).min() > 50
    # The user feature (identity) still refuses out-of-range ids.
    bad = with_column(small_table(3), "user_id", [1, 2, 10**12], pa.int64())
    with pytest.raises(DataError, match="user_id"):
        list(eval_loader(make_cfg([write_parquet(bad, "bad.parquet")], schema=schema, shuffle=False), 0, 1))
    # Features sharing a table must agree on the mapping.
    schema.id_features[1].mapping = IdMapping.identity
    with pytest.raises(ValueError, match="disagree on mapping"):
        schema.validate()
