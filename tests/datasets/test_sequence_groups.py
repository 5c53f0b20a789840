"""Tests of sequence groups, per-element (request-level) labels and model-declared sequence caps: schema
declarations, the reader's alignment and label checks, exact KJTs of a request-level file, and caps that
truncate one group only and keep the training stream resumable."""

from __future__ import annotations

import itertools
from typing import Callable

import pyarrow as pa
import pytest
import torch

from datasets.canonical import canonical_schema
from datasets.config import DataConfig
from datasets.reader import eval_loader, train_loader
from datasets.schema import DataError, FloatFeature, IdFeature, IdPolicy, SchemaConfig
from tests.datasets.helpers import make_cfg, small_schema, small_table
from tests.datasets.test_reader import assert_same_batches, take, with_column

# --------------------------------------------------------------------------------------------- schema


def request_schema() -> SchemaConfig:
    """One row per request: user, behaviour items (group history), candidates and their clicks (group
    candidates)."""
    return SchemaConfig(
        id_features=[
            IdFeature("user_id", 10),
            IdFeature("hist_item_id", 50, sequence=True, table="item"),
            IdFeature("cand_item_id", 50, sequence=True, table="item", group="candidates"),
        ],
        float_features=[FloatFeature("cand_score", sequence=True, group="candidates")],
        labels=[],
        sequence_labels=[FloatFeature("cand_click", sequence=True, group="candidates")],
        group_column="user_id",
    )


def replace_schema(schema: SchemaConfig, **changes: object) -> SchemaConfig:
    for k, v in changes.items():
        setattr(schema, k, v)
    return schema


def test_sequence_groups_in_schema_order() -> None:
    assert request_schema().sequence_groups() == {
        "history": ["hist_item_id"],
        "candidates": ["cand_item_id", "cand_score", "cand_click"],
    }
    names = ["hist_item_id", "hist_category", "hist_behavior_type", "hist_time_delta", "hist_relevance"]
    assert canonical_schema(5, 5, 5, with_relevance=True).sequence_groups() == {"history": names}
    assert small_schema(float_sequences=False).sequence_groups() == {"history": ["hist_item_id"]}


def test_sequence_labels_accept_list_of_float_int_bool() -> None:
    accepted = request_schema().arrow_types()["cand_click"]
    for t in (pa.float32(), pa.float64(), pa.int64(), pa.int32(), pa.int8(), pa.bool_()):
        assert pa.list_(t) in accepted and pa.large_list(t) in accepted
    assert pa.float32() not in accepted  # a scalar column is not a sequence label


def test_validate_labels_and_sequence_labels() -> None:
    request_schema().validate()  # no scalar labels: fine with sequence labels
    with pytest.raises(ValueError, match="at least one label column"):
        replace_schema(request_schema(), sequence_labels=[]).validate()
    with pytest.raises(ValueError, match="sequence label cand_click: set sequence: true"):
        replace_schema(request_schema(), sequence_labels=[FloatFeature("cand_click", group="candidates")]).validate()
    with pytest.raises(ValueError, match=r"more than once: \['cand_item_id'\]"):
        replace_schema(request_schema(), sequence_labels=[FloatFeature("cand_item_id", sequence=True)]).validate()
    with pytest.raises(ValueError, match=r"more than once: \['cand_click'\]"):
        replace_schema(request_schema(), labels=["cand_click"]).validate()


# ----------------------------------------------------------------------------------- request-level data


def request_table() -> pa.Table:
    """Three requests: histories of 3, 0, 2 behaviours; 2, 3, 1 candidates with scores and clicks."""
    return pa.table(
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),
            "hist_item_id": pa.array([[1, 2, 3], [], [4, 5]], pa.list_(pa.int64())),
            "cand_item_id": pa.array([[10, 11], [12, 13, 14], [15]], pa.list_(pa.int64())),
            "cand_score": pa.array([[0.5, 0.25], [1.0, 2.0, 3.0], [4.0]], pa.list_(pa.float64())),
            "cand_click": pa.array([[True, False], [False, False, True], [True]], pa.list_(pa.bool_())),
        }
    )


def request_cfg(path: str, batch_size: int = 3, **kw: object) -> DataConfig:
    return make_cfg([path], schema=request_schema(), batch_size=batch_size, shuffle=False, **kw)


def test_request_level_file_exact_kjts(write_parquet: Callable[..., str]) -> None:
    (b,) = list(eval_loader(request_cfg(write_parquet(request_table())), 0, 1))
    sf = b.sparse_features
    assert sf.keys() == ["user_id", "hist_item_id", "cand_item_id"] and sf.stride() == 3
    assert sf.lengths().tolist() == [1, 1, 1, 3, 0, 2, 2, 3, 1]
    assert sf.values().tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    fs = b.float_sequences
    assert fs.keys() == ["cand_score"] and fs.lengths().tolist() == [2, 3, 1]
    assert fs.values().tolist() == [0.5, 0.25, 1.0, 2.0, 3.0, 4.0]
    sl = b.sequence_labels
    assert sl.keys() == ["cand_click"] and sl.stride() == 3
    assert sl.lengths().tolist() == [2, 3, 1]
    assert sl.values().dtype == torch.float32 and sl.values().tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert b.labels.shape == (3, 0) and b.labels.dtype == torch.float32
    assert b.batch_size == 3
    assert b.group_ids.tolist() == [1, 2, 3]
    moved = b.to(torch.device("cpu"))
    assert moved.sequence_labels.keys() == ["cand_click"]
    assert moved.sequence_labels.values().tolist() == sl.values().tolist()


def test_no_sequence_labels_gives_empty_kjt_with_stride(write_parquet: Callable[..., str]) -> None:
    b = next(iter(eval_loader(make_cfg([write_parquet(small_table(6))], batch_size=3, shuffle=False), 0, 1)))
    assert b.sequence_labels.keys() == [] and b.sequence_labels.stride() == 3
    assert b.sequence_labels.values().dtype == torch.float32
    assert b.to(torch.device("cpu")).sequence_labels.stride() == 3


def test_request_level_eval_padding_and_shuffled_training(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(request_table())
    batches = list(eval_loader(request_cfg(path, batch_size=2), 0, 1))
    assert [b.valid.tolist() for b in batches] == [[True, True], [True, False]]
    assert batches[1].sequence_labels.lengths().tolist() == [1, 1]  # padding copies request 3
    cfg = request_cfg(path, batch_size=3)
    cfg.shuffle = True
    (b,) = take(train_loader(cfg, 0, 1), 1)
    clicks = b.sequence_labels["cand_click"].to_padded_dense(3).tolist()
    cands = b.sparse_features["cand_item_id"].to_padded_dense(3).tolist()
    by_cand = {c[0]: row for c, row in zip(cands, clicks)}  # rows stay whole under shuffling
    assert by_cand == {10: [1.0, 0.0, 0.0], 12: [0.0, 0.0, 1.0], 15: [1.0, 0.0, 0.0]}


@pytest.mark.parametrize(
    "bad_group, type_, shown",
    [
        ([[1, 0], [0, float("nan"), 1], [1]], pa.float32(), "label value nan (list position 1)"),
        ([[1, 0], [0, 2, 1], [1]], pa.int64(), "label value 2.0 (list position 1)"),
        ([[1, 0], [0, None, 1], [1]], pa.int64(), "null element at position 1"),
        ([[1, 0], None, [1]], pa.int64(), "null value"),
    ],
)
def test_bad_sequence_label(write_parquet: Callable[..., str], bad_group: list, type_: pa.DataType, shown: str) -> None:
    t = pa.concat_tables([request_table(), request_table()])  # rows 0..5, row groups of 3
    clicks = [[1, 0], [0, 0, 1], [1]] + bad_group  # row 1 of row group 1 (row 4 of the file) is bad
    path = write_parquet(with_column(t, "cand_click", clicks, pa.list_(type_)), "clicks.parquet", row_group_size=3)
    with pytest.raises(DataError) as err:
        list(eval_loader(request_cfg(path), 0, 1))
    msg = str(err.value)
    for part in ("clicks.parquet", "row group 1", "row 4 (row index within the file; row 1 of the row group)",
                 "column 'cand_click'", shown):
        assert part in msg, (part, msg)


# ------------------------------------------------------------------------------------- misaligned groups


def test_misaligned_group_names_row_both_columns_and_lengths(write_parquet: Callable[..., str]) -> None:
    t = small_table(8)  # hist lengths r % 4: row 6 has 2 behaviours
    deltas = t["hist_time_delta"].to_pylist()
    deltas[6] = [5.0]
    path = write_parquet(with_column(t, "hist_time_delta", deltas, pa.list_(pa.float32())), "skew.parquet", 4)
    with pytest.raises(DataError) as err:
        list(eval_loader(make_cfg([path], shuffle=False), 0, 1))
    msg = str(err.value)
    for part in ("skew.parquet", "row group 1", "row 6 (row index within the file; row 2 of the row group)",
                 "column 'hist_time_delta': 1 elements", "column 'hist_item_id'", "group 'history' has 2",
                 "same length in every row"):
        assert part in msg, (part, msg)


def test_misaligned_candidates_group(write_parquet: Callable[..., str]) -> None:
    t = with_column(request_table(), "cand_click", [[1, 0], [0, 1], [1]], pa.list_(pa.int8()))
    with pytest.raises(DataError, match=r"row 1 .* column 'cand_click': 2 elements, but column 'cand_item_id' "
                                        r"of the same sequence group 'candidates' has 3"):
        list(eval_loader(request_cfg(write_parquet(t)), 0, 1))


def test_groups_of_different_lengths_are_independent(write_parquet: Callable[..., str]) -> None:
    """history and candidates differ in length in every row (3 vs 2, 0 vs 3, 2 vs 1): no error."""
    (b,) = list(eval_loader(request_cfg(write_parquet(request_table())), 0, 1))
    assert b.sparse_features["hist_item_id"].lengths().tolist() == [3, 0, 2]


# ------------------------------------------------------------------------------------------------- caps


def test_caps_truncate_one_group_keep_tails_together(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(request_table())
    (b,) = list(eval_loader(request_cfg(path), 0, 1, sequence_caps={"candidates": 2}))
    assert b.sparse_features["hist_item_id"].values().tolist() == [1, 2, 3, 4, 5]  # history untouched
    assert b.sparse_features["cand_item_id"].values().tolist() == [10, 11, 13, 14, 15]  # tails of 2
    assert b.float_sequences["cand_score"].values().tolist() == [0.5, 0.25, 2.0, 3.0, 4.0]
    assert b.sequence_labels["cand_click"].values().tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert b.sequence_labels["cand_click"].lengths().tolist() == [2, 2, 1]
    (b,) = list(eval_loader(request_cfg(path), 0, 1, sequence_caps={"history": 1, "candidates": 0}))
    assert b.sparse_features["hist_item_id"].values().tolist() == [3, 5]
    assert b.sparse_features["cand_item_id"].lengths().tolist() == [2, 3, 1]  # 0 = no cap


def test_caps_combine_with_max_sequence_length(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(request_table())
    (b,) = list(eval_loader(request_cfg(path, max_sequence_length=2), 0, 1, sequence_caps={"history": 1}))
    assert b.sparse_features["hist_item_id"].lengths().tolist() == [1, 0, 1]  # min(2, 1)
    assert b.sparse_features["cand_item_id"].lengths().tolist() == [2, 2, 1]  # max_sequence_length alone
    (b,) = list(eval_loader(request_cfg(path, max_sequence_length=1), 0, 1, sequence_caps={"history": 3}))
    assert b.sparse_features["hist_item_id"].lengths().tolist() == [1, 0, 1]  # min(1, 3)


def test_caps_on_canonical_history_columns(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(small_table(8))
    (b,) = list(eval_loader(make_cfg([path], batch_size=8, shuffle=False), 0, 1, sequence_caps={"history": 2}))
    assert b.sparse_features["hist_item_id"].lengths().tolist() == [0, 1, 2, 2, 0, 1, 2, 2]
    assert b.float_sequences["hist_time_delta"].lengths().tolist() == [0, 1, 2, 2, 0, 1, 2, 2]
    # row 3: items [3, 4, 5], deltas [300, 200, 100] -> the last two of each
    assert b.sparse_features["hist_item_id"].to_padded_dense(2)[3].tolist() == [4, 5]
    assert b.float_sequences["hist_time_delta"].to_padded_dense(2)[3].tolist() == [200.0, 100.0]


def test_unknown_or_negative_cap_is_an_error(write_parquet: Callable[..., str]) -> None:
    cfg = make_cfg([write_parquet(small_table(8))])
    unknown = r"unknown sequence groups \['candidates'\]; the schema's groups are \['history'\]"
    with pytest.raises(ValueError, match=unknown):
        train_loader(cfg, 0, 1, sequence_caps={"candidates": 5})
    with pytest.raises(ValueError, match="unknown sequence groups"):
        eval_loader(cfg, 0, 1, sequence_caps={"candidates": 5})
    with pytest.raises(ValueError, match=r"sequence_caps\['history'\] must be >= 0"):
        eval_loader(cfg, 0, 1, sequence_caps={"history": -1})


def test_caps_count_surviving_fixes_and_validate_the_whole_sequence(write_parquet: Callable[..., str]) -> None:
    t = with_column(small_table(3), "hist_item_id", [[], [40], [-1, 23]], pa.list_(pa.int64()))
    t = with_column(t, "hist_time_delta", [[], [1.0], [2.0, 1.0]], pa.list_(pa.float32()))
    path = write_parquet(t)
    cfg = make_cfg([path], batch_size=3, shuffle=False, id_policy=IdPolicy.clip)
    (b,) = list(eval_loader(cfg, 0, 1, sequence_caps={"history": 1}))
    assert b.sparse_features["hist_item_id"].values().tolist() == [19, 19]  # 40 -> 19, 23 -> 19; -1 cut
    assert b.id_fixes.tolist() == [0, 0, 2]
    t = with_column(t, "hist_item_id", [[], [4], [-1, 3]], pa.list_(pa.int64()))  # only the cut id is bad
    cfg = make_cfg([write_parquet(t, "cut.parquet")], batch_size=3, shuffle=False)
    with pytest.raises(DataError, match=r"row 2 .* id -1 \(list position 0\)"):  # cut away, still checked
        list(eval_loader(cfg, 0, 1, sequence_caps={"history": 1}))


@pytest.mark.parametrize("start_step", [3, 7])
def test_start_step_with_caps_equals_dropping_batches(write_parquet: Callable[..., str], start_step: int) -> None:
    path = write_parquet(small_table(22), row_group_size=6)
    cfg = make_cfg([path], batch_size=4, seed=3)
    caps = {"history": 2}
    fresh = take(train_loader(cfg, 0, 1, sequence_caps=caps), 12)
    assert max(int(b.sparse_features["hist_item_id"].lengths().max()) for b in fresh) == 2
    resumed = take(train_loader(cfg, 0, 1, start_step=start_step, sequence_caps=caps), 12 - start_step)
    assert_same_batches(resumed, fresh[start_step:])
    for x, y in zip(resumed, fresh[start_step:]):
        assert torch.equal(x.float_sequences.lengths(), y.float_sequences.lengths())
    uncapped = take(train_loader(cfg, 0, 1), 12)  # same rows in the same order, only shorter histories
    assert [b.group_ids.tolist() for b in uncapped] == [b.group_ids.tolist() for b in fresh]


def test_caps_with_worker_processes(write_parquet: Callable[..., str]) -> None:
    path = write_parquet(request_table())
    cfg = request_cfg(path, batch_size=1, num_workers=2)
    batches = list(eval_loader(cfg, 0, 1, {"candidates": 1}))  # caps travel to the worker processes
    values = [b.sparse_features["cand_item_id"].values().tolist() for b in batches if bool(b.valid.all())]
    assert sorted(itertools.chain.from_iterable(values)) == [11, 14, 15]


def test_caps_in_exact_epochs_keep_rows_and_resume(write_parquet: Callable[..., str]) -> None:
    """Exact epochs truncate like the infinite stream; rows stay whole and every row comes once per epoch."""
    path = write_parquet(small_table(22), row_group_size=6)
    cfg = make_cfg([path], batch_size=4, seed=3)
    caps = {"history": 1}
    fresh = list(train_loader(cfg, 0, 1, sequence_caps=caps, epochs=2))
    assert len(fresh) == 2 * 6  # ceil(22 / 4) per epoch
    for b in fresh:
        lengths = b.sparse_features["hist_item_id"].lengths().tolist()
        assert lengths == [min(int(t) % 4, 1) for t in b.float_features[:, 0].tolist()]  # row r keeps min(r % 4, 1)
    epoch0 = [int(t) for b in fresh[:6] for t, v in zip(b.float_features[:, 0].tolist(), b.valid.tolist()) if v]
    assert sorted(epoch0) == list(range(22))
    assert_same_batches(list(train_loader(cfg, 0, 1, start_step=8, sequence_caps=caps, epochs=2)), fresh[8:])
