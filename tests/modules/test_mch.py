"""``mapping: mch``: torchrec's managed-collision (ZCH) tables behind the zoo's embedding builders (CPU).

Raw 64-bit ids (negatives and ids far above the table size included) always land in ``[0, rows)``; a raw id
keeps its row; hot ids of a skewed stream keep rows of their own while cold ones share the miss row;
evaluation changes nothing; the ZCH state is in the state dict and reloads; the builders' output is the
plain collection's; bad options fail with one line naming the field.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from datasets.schema import IdFeature, IdMapping, MchConfig, MchEvictionPolicy, SchemaConfig, splitmix64
from modules.embedding import build_embedding_bag_collection, build_embedding_collection
from modules.managed_collision import (
    ManagedCollisionLookup,
    build_managed_collection,
    build_mch_module,
    hash_input_ids,
    splitmix64_torch,
)

ROWS = 8  # 7 rows of their own + the miss row (the last)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _schema(mch: MchConfig = MchConfig(), rows: int = ROWS) -> SchemaConfig:
    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id", 5),
            IdFeature("item_id", rows, table="item_id", mapping=IdMapping.mch, mch=mch),
            IdFeature("hist_item_id", rows, sequence=True, table="item_id", mapping=IdMapping.mch, mch=mch),
        ],
        labels=["click"],
    )
    schema.validate()
    return schema


def _kjt(users: list[int], items: list[int], hist: list[list[int]]) -> KeyedJaggedTensor:
    values = users + items + [i for row in hist for i in row]
    lengths = [1] * (len(users) + len(items)) + [len(row) for row in hist]
    return KeyedJaggedTensor(keys=["user_id", "item_id", "hist_item_id"], values=torch.tensor(values),
                             lengths=torch.tensor(lengths))


def _zch(mch: MchConfig = MchConfig(), rows: int = ROWS):
    """A bare ZCH module of the item table and a function ``ids [S] -> rows [S]`` through it."""
    module = build_mch_module("t_item_id", rows, mch, torch.device("cpu"))

    def remap(ids: torch.Tensor) -> torch.Tensor:
        jt = JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))
        return module({"t_item_id": jt})["t_item_id"].values()

    return module, remap


def test_torch_splitmix64_equals_the_readers_numpy_hash() -> None:
    ids = np.concatenate([np.array([0, 1, -1, INT64_MIN, INT64_MAX, 2**62 + 5]),
                          np.random.default_rng(0).integers(INT64_MIN, INT64_MAX, 1000, dtype=np.int64)])
    got = splitmix64_torch(torch.from_numpy(ids)).numpy().view(np.uint64)
    np.testing.assert_array_equal(got, splitmix64(ids))
    for n in (2, 1000, 2**40 + 3, INT64_MAX):
        h = hash_input_ids(torch.from_numpy(ids), n)
        assert int(h.min()) >= 0 and int(h.max()) < n
        expected = (splitmix64(ids) & np.uint64(INT64_MAX)) % np.uint64(n)
        np.testing.assert_array_equal(h.numpy(), expected.astype(np.int64))


@pytest.mark.parametrize("mch", [MchConfig(), MchConfig(eviction_policy=MchEvictionPolicy.lfu, eviction_interval=3),
                                 MchConfig(hash_input=False)])
def test_rows_always_in_range_and_stable_per_raw_id(mch: MchConfig) -> None:
    module, remap = _zch(mch)
    rng = np.random.default_rng(1)
    low = 0 if not mch.hash_input else INT64_MIN  # without hashing the reader guarantees [0, input_hash_size)
    module.train()
    for _ in range(12):
        ids = torch.from_numpy(rng.integers(low, INT64_MAX, 40, dtype=np.int64))
        ids[::4] = ids[0]  # a repeated raw id within the batch
        rows = remap(ids)
        assert int(rows.min()) >= 0 and int(rows.max()) < ROWS
        assert len(set(rows[::4].tolist())) == 1
    # After training: a raw id maps to the same row every time (evaluation); distinct kept ids, distinct rows.
    module.eval()
    kept = module._mch_sorted_raw_ids[module._mch_sorted_raw_ids != INT64_MAX]
    assert kept.numel() == ROWS - 1  # the ZCH filled up (7 rows of their own)
    fresh = torch.from_numpy(rng.integers(low, INT64_MAX, 30, dtype=np.int64))
    assert torch.equal(remap(fresh), remap(fresh))
    own = module._mch_remapped_ids_mapping[module._mch_sorted_raw_ids != INT64_MAX]
    assert sorted(own.tolist()) == list(range(ROWS - 1))  # every kept id has its own row, the miss row is free


@pytest.mark.parametrize("policy", list(MchEvictionPolicy))
def test_hot_ids_keep_their_rows_on_a_skewed_stream(policy: MchEvictionPolicy) -> None:
    """5 hot raw ids in every batch among unique cold ones: once admitted, each hot id keeps one row for the
    rest of training, distinct from the other hot ids and from the miss row; cold ids are churned through the
    two remaining rows or the miss row."""
    _, remap = _zch(MchConfig(eviction_policy=policy))
    hot = torch.tensor([3, -(2**40), 2**62 + 1, 99_999_999_999, 7 * 10**17])
    rng = np.random.default_rng(2)
    first = None
    for step in range(20):
        cold = torch.from_numpy(rng.integers(INT64_MIN, INT64_MAX, 6, dtype=np.int64))
        rows = remap(torch.cat([hot.repeat(4), cold]))  # [20 + 6]
        hot_rows = rows[: hot.numel()]
        assert torch.equal(rows[: 4 * hot.numel()], hot_rows.repeat(4))
        if first is None:
            first = hot_rows.clone()
        assert torch.equal(hot_rows, first), f"step {step}: hot ids moved from rows {first} to {hot_rows}"
    assert len(set(first.tolist())) == hot.numel() and ROWS - 1 not in first.tolist()
    # the cold ids of the last step: none on a hot id's row
    assert not set(rows[4 * hot.numel():].tolist()) & set(first.tolist())


def test_evaluation_reads_the_zch_and_leaves_it_unchanged() -> None:
    module, remap = _zch()
    module.train()
    seen = torch.tensor([11, 12, 13])
    rows = remap(seen)
    module.eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    unseen = torch.tensor([10**18, -(10**18), 5])
    assert remap(unseen).tolist() == [ROWS - 1] * 3  # the miss row
    assert torch.equal(remap(seen), rows)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"evaluation changed {k}"


def test_lookup_returns_the_plain_collections_output_at_the_remapped_rows() -> None:
    schema = _schema()
    torch.manual_seed(0)
    ec = build_embedding_collection(schema, ["user_id", "item_id", "hist_item_id"], 4)
    assert isinstance(ec, ManagedCollisionLookup) and ec.plain is not None
    kjt = _kjt([1, 4], [2**62, -9], [[2**62, 17], [-9]])
    out = ec(kjt)
    assert list(out) == ["item_id", "hist_item_id", "user_id"]
    assert out["hist_item_id"].lengths().tolist() == [2, 1] and out["hist_item_id"].values().shape == (3, 4)
    weight = ec.managed._embedding_module.embeddings["t_item_id"].weight
    rows = ec.managed._managed_collision_collection(kjt)  # train mode: the same ids again, the same rows
    item_rows = rows["item_id"].values()
    assert item_rows.tolist() == rows["hist_item_id"].values()[[0, 2]].tolist()  # one row per raw id, either feature
    torch.testing.assert_close(out["item_id"].values(), weight[item_rows])
    user_weight = ec.plain.embeddings["t_user_id"].weight
    torch.testing.assert_close(out["user_id"].values(), user_weight[[1, 4]])
    # no mch feature: the plain EmbeddingCollection, unchanged
    plain = build_embedding_collection(schema, ["user_id"], 4)
    assert type(plain).__name__ == "EmbeddingCollection"


def test_bag_lookup_pools_at_the_remapped_rows() -> None:
    schema = _schema()
    ebc = build_embedding_bag_collection(schema, ["user_id", "hist_item_id"], 4)
    assert isinstance(ebc, ManagedCollisionLookup) and ebc.bagged
    kjt = _kjt([0, 3], [1, 1], [[5, 6], [6]])
    out = ebc(kjt)
    assert out.keys() == ["hist_item_id", "user_id"] and out.values().shape == (2, 8)
    rows = ebc.managed._managed_collision_collection(kjt)["hist_item_id"].values()
    w = ebc.managed._embedding_module.embedding_bags["t_item_id"].weight
    torch.testing.assert_close(out["hist_item_id"], torch.stack([w[rows[0]] + w[rows[1]], w[rows[2]]]))


def test_zch_state_is_in_the_state_dict_and_reloads() -> None:
    schema = _schema()
    torch.manual_seed(0)
    a = build_embedding_collection(schema, ["item_id", "hist_item_id"], 4)
    ids = torch.tensor([2**61, -1, 42, 2**61])
    a(KeyedJaggedTensor(keys=["item_id", "hist_item_id"], values=ids, lengths=torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])))
    state = a.state_dict()
    prefix = "managed._managed_collision_collection._managed_collision_modules.t_item_id."
    for name in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts", "_mch_last_access_iter"):
        assert prefix + name in state
    b = build_embedding_collection(schema, ["item_id", "hist_item_id"], 4)
    b.load_state_dict(state)
    a.eval(), b.eval()
    probe = KeyedJaggedTensor(keys=["item_id", "hist_item_id"], values=torch.tensor([42, 2**61, -1, 7]),
                              lengths=torch.tensor([1, 1, 1, 1]))
    ra = a.managed._managed_collision_collection(probe).values()
    rb = b.managed._managed_collision_collection(probe).values()
    assert torch.equal(ra, rb) and ra[:3].tolist() != [ROWS - 1] * 3 and int(ra[3]) == ROWS - 1
    torch.testing.assert_close(a(probe)["item_id"].values(), b(probe)["item_id"].values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eviction_interval": 0}, "id feature item_id: mch.eviction_interval must be >= 1"),
        ({"decay_exponent": -1.0}, "id feature item_id: mch.decay_exponent must be >= 0"),
        ({"input_hash_size": ROWS - 1}, r"id feature item_id: mch.input_hash_size must be in \[num_embeddings"),
        ({"input_hash_size": 2**63}, r"id feature item_id: mch.input_hash_size must be in"),
    ],
)
def test_bad_mch_options_fail_naming_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        _schema(replace(MchConfig(), **change))
    assert "\n" not in str(e.value)


def test_mch_needs_two_rows_and_one_option_set_per_table() -> None:
    with pytest.raises(ValueError, match="item_id: mapping mch needs num_embeddings >= 2"):
        _schema(rows=1)
    schema = _schema()
    schema.id_features[2].mch = MchConfig(eviction_interval=5)
    with pytest.raises(ValueError, match="features sharing table t_item_id disagree on mch options"):
        schema.validate()


def mch_din_yaml(item_rows: int = 257, eviction_policy: str = "distance_lfu", eviction_interval: int = 1) -> str:
    """An experiment YAML: configs/tests/din_tiny.yaml with ``mapping: mch`` on the item table (a ZCH of
    ``item_rows`` rows for the ~1000 synthetic items)."""
    from pathlib import Path

    din = Path(__file__).resolve().parents[2] / "configs/tests/din_tiny.yaml"
    mch = f"{{mapping: mch, mch: {{eviction_policy: {eviction_policy}, eviction_interval: {eviction_interval}}}}}"
    item = f"num_embeddings: {item_rows}, table: item_id, mapping: mch, mch: {mch[mch.index('mch: ') + 5:-1]}"
    return f"""includes: [{din}]
data:
  schema:
    id_features:
      - {{name: user_id, num_embeddings: 201}}
      - {{name: item_id, {item}}}
      - {{name: item_category, num_embeddings: 51, table: item_category}}
      - {{name: hist_item_id, sequence: true, {item}}}
      - {{name: hist_category, num_embeddings: 51, sequence: true, table: item_category}}
      - {{name: hist_behavior_type, num_embeddings: 5, sequence: true}}
"""


def test_bad_mch_option_in_yaml_is_a_one_line_config_error(tmp_path) -> None:
    from launch.config import ConfigError, load_config

    cfg = tmp_path / "din_mch.yaml"
    cfg.write_text(mch_din_yaml())
    loaded, _, _ = load_config(cfg)
    item = loaded.data.schema.id_feature("hist_item_id")
    assert item.mapping is IdMapping.mch and item.mch == MchConfig() and item.num_embeddings == 257
    cfg.write_text(mch_din_yaml(eviction_policy="lru"))
    with pytest.raises(ConfigError, match="eviction_policy") as e:
        load_config(cfg)
    assert "\n" not in str(e.value) and "lru" in str(e.value)
    cfg.write_text(mch_din_yaml(eviction_interval=0))
    with pytest.raises(ConfigError, match="mch.eviction_interval must be >= 1") as e:
        load_config(cfg)
    assert "\n" not in str(e.value)


def test_mch_tables_refuse_replicated_tables(tmp_path) -> None:
    """optim.sparse=replicated_adam keeps the tables unsharded under DDP: every rank would have its own ZCH."""
    from launch.config import ConfigError, load_config, validate_experiment

    cfg = tmp_path / "din_mch.yaml"
    cfg.write_text(mch_din_yaml())
    loaded, spec, _ = load_config(cfg)
    validate_experiment(loaded, spec)
    loaded, spec, _ = load_config(cfg, ["optim.sparse=replicated_adam"])
    with pytest.raises(ConfigError, match=r"optim: tables \['t_item_id'\] use mapping: mch, but optim.sparse="
                                          "replicated_adam") as e:
        validate_experiment(loaded, spec)
    assert "\n" not in str(e.value)


def test_reader_passes_raw_ids_through_or_checks_the_input_range() -> None:
    from datasets.schema import DataError
    from tests.models.batch_helpers import columns_to_batch

    raw = [2**62 + 7, -5, 123]
    cols = {"user_id": [1, 2, 3], "item_id": raw, "hist_item_id": [[-5, 2**40], [], [123]], "click": [0.0, 1.0, 0.0]}
    batch = columns_to_batch(_schema(), cols)
    assert batch.sparse_features["item_id"].values().tolist() == raw  # hash_input: any int64, untouched
    assert batch.sparse_features["hist_item_id"].values().tolist() == [-5, 2**40, 123]
    strict = _schema(MchConfig(hash_input=False, input_hash_size=2**40))
    with pytest.raises(DataError, match=r"'item_id': id 4611686018427387911 is outside mch.input_hash_size's range"
                                         r" \[0, 1099511627776\)"):
        columns_to_batch(strict, cols)
    cols["item_id"] = [0, 2**40 - 1, 123]
    with pytest.raises(DataError, match=r"'hist_item_id': id -5 \(list position 0\) is outside"):  # negatives too
        columns_to_batch(strict, cols)
    cols["hist_item_id"] = [[5, 2**40 - 1], [], [123]]
    assert columns_to_batch(strict, cols).sparse_features["hist_item_id"].values().tolist() == [5, 2**40 - 1, 123]
