"""Tests of the sharding layer (launch/sharding.py and the modules it re-exports): table keys (full names,
globs) and constraint merging, planning without a process group, a co-trained model with two tables of one
feature (planned locally, and sharded in 2 gloo ranks), plan JSON round trip, plan checks on load, and the
text table. More multi-process tests: tests/dist/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheAlgorithm,
    CacheParams,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.types import DataType

from launch.sharding import (
    COMPUTE_KERNELS,
    SHARDING_TYPES,
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_tables,
    merge_constraints,
    plan,
    plan_from_json,
    plan_table,
    plan_to_json,
    select_tables,
    shard_model,
    write_plan,
)
from datasets.schema import IdFeature, SchemaConfig
from models.registry import TableConstraint
from modules.embedding import build_embedding_collection
from tests.dist.parity import gather_full_state
from tests.dist.reference_model import build_reference_train_module
from tests.dist.runner import run_workers

TABLES = ["t_item", "t_category", "t_user"]
ROLE_TABLES = ["t_item_id", "t_item_id__attn", "t_item_id__repr", "t_user_id__attn"]
CPU = torch.device("cpu")


def _meta_model() -> torch.nn.Module:
    return build_reference_train_module(torch.device("meta"))


def _plan_2_ranks(cfg: ShardingConfig, defaults: dict | None = None) -> ShardingPlan:
    """Plans the reference model for 2 CPU ranks in this one process (no process group)."""
    return plan(_meta_model(), cfg, defaults or {}, build_topology(2, 2, CPU), build_sharders())


def read_plan(path: Path) -> ShardingPlan:
    """A ``plan.json`` written by write_plan, as ShardingPlan (production reads it through ``plan_path``)."""
    return plan_from_json(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------- constraints


def test_unknown_table_lists_model_tables() -> None:
    cfg = ShardingConfig(tables={"t_itme": TableShardingConfig(sharding_types=["row_wise"])})
    with pytest.raises(ValueError, match=r"t_itme") as e:
        merge_constraints({}, cfg, TABLES)
    assert all(t in str(e.value) for t in TABLES)


def test_unknown_table_in_model_defaults() -> None:
    with pytest.raises(ValueError, match=r"default constraints.*t_gone"):
        merge_constraints({"t_gone": TableConstraint(("row_wise",))}, ShardingConfig(), TABLES)


@pytest.mark.parametrize(
    "cfg",
    [
        ShardingConfig(tables={"t_item": TableShardingConfig(sharding_types=["rowwise"])}),
        ShardingConfig(default_sharding_types=["rowwise"]),
    ],
)
def test_bad_sharding_type_lists_valid_values(cfg: ShardingConfig) -> None:
    with pytest.raises(ValueError, match=r"unknown sharding type \['rowwise'\]") as e:
        merge_constraints({}, cfg, TABLES)
    assert all(t in str(e.value) for t in SHARDING_TYPES)


def test_bad_kernel_lists_valid_values() -> None:
    cfg = ShardingConfig(tables={"t_user": TableShardingConfig(compute_kernels=["fast"])})
    with pytest.raises(ValueError, match=r"unknown compute kernel \['fast'\]") as e:
        merge_constraints({}, cfg, TABLES)
    assert all(k in str(e.value) for k in COMPUTE_KERNELS)
    with pytest.raises(ValueError, match=r"default constraint of t_user: unknown compute kernel"):
        merge_constraints({"t_user": TableConstraint(compute_kernels=("fast",))}, ShardingConfig(), TABLES)


def test_keys_select_tables_by_full_name_then_first_matching_glob() -> None:
    keys = {
        "t_item_id__*": TableShardingConfig(sharding_types=["column_wise"], min_partition=4),
        "*__attn": TableShardingConfig(sharding_types=["table_wise"]),
        "t_item_id__repr": TableShardingConfig(compute_kernels=["fused"]),
    }
    assert select_tables(keys, ROLE_TABLES) == {
        "t_item_id__attn": "t_item_id__*",  # both globs match: the first in config order wins
        "t_item_id__repr": "t_item_id__repr",  # the exact name beats the globs that match it
        "t_user_id__attn": "*__attn",
    }  # t_item_id has no role: "t_item_id__*" does not select it
    c = merge_constraints({"t_item_id": TableConstraint(("row_wise",))}, ShardingConfig(tables=keys), ROLE_TABLES)
    assert c["t_item_id__attn"].sharding_types == ["column_wise"] and c["t_item_id__attn"].min_partition == 4
    assert c["t_item_id__repr"].sharding_types is None and c["t_item_id__repr"].compute_kernels == ["fused"]
    assert c["t_item_id__repr"].min_partition is None  # one entry per table: the globs' fields do not merge in
    assert c["t_user_id__attn"].sharding_types == ["table_wise"]
    assert c["t_item_id"].sharding_types == ["row_wise"]  # the model's default
    assert set(c) == set(ROLE_TABLES)


@pytest.mark.parametrize("key", ["*__atn", "t_item_id___attn", "item_id", "T_ITEM_ID"])
def test_key_selecting_no_table_lists_the_tables(key: str) -> None:
    cfg = ShardingConfig(tables={"*__attn": TableShardingConfig(), key: TableShardingConfig()})
    with pytest.raises(ValueError, match="name tables the model does not have") as e:
        merge_constraints({}, cfg, ROLE_TABLES)
    assert repr([key]) in str(e.value) and all(t in str(e.value) for t in ROLE_TABLES)


def test_config_overrides_model_defaults_field_by_field() -> None:
    defaults = {
        "t_item": TableConstraint(sharding_types=("row_wise", "table_wise"), compute_kernels=("fused",)),
        "t_user": TableConstraint(sharding_types=("table_wise",)),
    }
    cfg = ShardingConfig(tables={"t_item": TableShardingConfig(sharding_types=["column_wise"], min_partition=4)})
    c = merge_constraints(defaults, cfg, TABLES)
    assert c["t_item"].sharding_types == ["column_wise"]  # config entry wins
    assert c["t_item"].compute_kernels == ["fused"]  # unset in config: the model's default stays
    assert c["t_item"].min_partition == 4
    assert c["t_user"].sharding_types == ["table_wise"]  # model default
    assert "t_category" not in c  # nothing constrained: the planner is free

    c = merge_constraints(defaults, ShardingConfig(default_sharding_types=["row_wise"]), TABLES)
    assert {t: c[t].sharding_types for t in TABLES} == {t: ["row_wise"] for t in TABLES}


def test_sharder_support_is_checked_per_module_type() -> None:
    # The sharded EmbeddingCollection has no table_row_wise; the bag collection has it, also on CPU.
    with pytest.raises(ValueError, match=r"t_item \(EmbeddingCollection\).*table_row_wise.*supported: "):
        _plan_2_ranks(ShardingConfig(tables={"t_item": TableShardingConfig(sharding_types=["table_row_wise"])}))
    with pytest.raises(ValueError, match=r"t_user .*fused_uvm.*not available on cpu"):
        _plan_2_ranks(ShardingConfig(tables={"t_user": TableShardingConfig(compute_kernels=["fused_uvm"])}))
    p = _plan_2_ranks(ShardingConfig(tables={"t_user": TableShardingConfig(sharding_types=["table_row_wise"])}))
    assert p.plan["model.ebc"]["t_user"].sharding_type == "table_row_wise"


def test_embedding_collection_is_never_data_parallel() -> None:
    # torchrec 1.8's data-parallel EmbeddingCollection breaks on KJTs with other tables' features.
    with pytest.raises(ValueError, match=r"t_item \(EmbeddingCollection\).*data_parallel.*supported: "):
        _plan_2_ranks(ShardingConfig(tables={"t_item": TableShardingConfig(sharding_types=["data_parallel"])}))
    p = _plan_2_ranks(ShardingConfig())  # tiny tables: the planner would pick data_parallel if it could
    assert p.plan["model.ec"]["t_item"].sharding_type != "data_parallel"
    assert p.plan["model.ec"]["t_category"].sharding_type != "data_parallel"


def test_structured_config_from_yaml() -> None:
    yaml = """
    tables:
      t_item: {sharding_types: [row_wise]}
      t_category: {sharding_types: [column_wise], min_partition: 4}
    default_sharding_types: [table_wise]
    batch_size: 64
    """
    merged = OmegaConf.merge(OmegaConf.structured(ShardingConfig), OmegaConf.create(yaml))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ShardingConfig) and isinstance(cfg.tables["t_item"], TableShardingConfig)
    assert cfg.tables["t_category"].min_partition == 4 and cfg.plan_path is None and cfg.hbm_cap is None
    globbed = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ShardingConfig), OmegaConf.create('tables: {"*__attn": {}, t_item: {}}'))
    )
    assert list(globbed.tables) == ["*__attn", "t_item"]  # config order survives (first matching glob wins)
    with pytest.raises(Exception, match="shardingtypes"):
        OmegaConf.merge(
            OmegaConf.structured(ShardingConfig), OmegaConf.create({"tables": {"t": {"shardingtypes": []}}})
        )


# ------------------------------------------------------------------------------------------- planning


def test_plan_without_process_group_follows_constraints() -> None:
    p = _plan_2_ranks(
        ShardingConfig(
            tables={
                "t_item": TableShardingConfig(sharding_types=["row_wise"]),
                "t_category": TableShardingConfig(sharding_types=["column_wise"], min_partition=4),
            },
            batch_size=64,
        ),
        defaults={"t_user": TableConstraint(sharding_types=("data_parallel",))},
    )
    item, category, user = p.plan["model.ec"]["t_item"], p.plan["model.ec"]["t_category"], p.plan["model.ebc"]["t_user"]
    assert item.sharding_type == "row_wise" and item.compute_kernel == "fused"
    assert [(s.shard_offsets, s.shard_sizes) for s in item.sharding_spec.shards] == [
        ([0, 0], [11, 8]),
        ([11, 0], [10, 8]),
    ]
    assert category.sharding_type == "column_wise"
    assert [s.shard_sizes for s in category.sharding_spec.shards] == [[12, 4]] * 2
    assert user.sharding_type == "data_parallel" and user.sharding_spec is None and user.compute_kernel == "dense"


# ------------------------------------------------------------------------------------------- co-training

COTRAIN_SCHEMA = SchemaConfig(
    id_features=[
        IdFeature("user_id", 15),
        IdFeature("item_id", 21, table="item_id"),
        IdFeature("hist_item_id", 21, sequence=True, table="item_id"),
    ],
    labels=["click"],
)
COTRAIN_FEATURES = ["item_id", "hist_item_id"]


class CoTrained(torch.nn.Module):
    """Two sub-models over the same item features, each with its own item table (roles ``a`` and ``b``).

    ``forward(kjt) -> (a [S, 16], b [S, 8])``: both sub-models' embeddings of the ``hist_item_id`` ids (S ids).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.a = build_embedding_collection(COTRAIN_SCHEMA, COTRAIN_FEATURES, 16, device, role="a")
        self.b = build_embedding_collection(COTRAIN_SCHEMA, COTRAIN_FEATURES, 8, device, role="b")

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(kjt)["hist_item_id"].values(), self.b(kjt)["hist_item_id"].values()


def _plan_cotrained(cfg: ShardingConfig, world_size: int = 2) -> ShardingPlan:
    return plan(CoTrained(torch.device("meta")), cfg, {}, build_topology(world_size, world_size, CPU), build_sharders())


def test_cotrained_tables_of_one_feature_are_planned_apart() -> None:
    tables = embedding_tables(CoTrained(torch.device("meta")))
    assert {n: (t.module_path, t.table, t.role, t.rows, t.dim) for n, t in tables.items()} == {
        "t_item_id__a": ("a", "item_id", "a", 21, 16),
        "t_item_id__b": ("b", "item_id", "b", 21, 8),
    }
    # A constraint by full name applies to that table only.
    only_a = ShardingConfig(tables={"t_item_id__a": TableShardingConfig(sharding_types=["row_wise"])})
    assert set(merge_constraints({}, only_a, tables)) == {"t_item_id__a"}
    p = _plan_cotrained(
        ShardingConfig(
            tables={
                "t_item_id__a": TableShardingConfig(sharding_types=["row_wise"]),
                "t_item_id__*": TableShardingConfig(sharding_types=["column_wise"], min_partition=4),
            }
        )
    )
    assert set(p.plan) == {"a", "b"} and list(p.plan["a"]) == ["t_item_id__a"] and list(p.plan["b"]) == ["t_item_id__b"]
    a, b = p.plan["a"]["t_item_id__a"], p.plan["b"]["t_item_id__b"]
    assert a.sharding_type == "row_wise" and [s.shard_sizes for s in a.sharding_spec.shards] == [[11, 16], [10, 16]]
    assert b.sharding_type == "column_wise" and [s.shard_sizes for s in b.sharding_spec.shards] == [[21, 4]] * 2
    # The plan's JSON and text name each table's feature table and role.
    d = plan_to_json(p)
    assert (d["a"]["t_item_id__a"]["table"], d["a"]["t_item_id__a"]["role"]) == ("item_id", "a")
    assert (d["b"]["t_item_id__b"]["table"], d["b"]["t_item_id__b"]["role"]) == ("item_id", "b")
    assert plan_from_json(d) == p
    lines = plan_table(p, tables).splitlines()
    assert next(line for line in lines if " t_item_id__b " in line).split()[:8] == [
        "b", "t_item_id__b", "item_id", "b", "21", "8", "fp32", "column_wise"
    ]


def test_same_table_name_in_two_collections_is_refused() -> None:
    class Clash(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            meta = torch.device("meta")
            self.a = build_embedding_collection(COTRAIN_SCHEMA, COTRAIN_FEATURES, 8, meta, role="x")
            self.b = build_embedding_collection(COTRAIN_SCHEMA, COTRAIN_FEATURES, 8, meta, role="x")

    with pytest.raises(ValueError, match=r"'t_item_id__x' appears in both 'a' and 'b'.*distinct roles"):
        embedding_tables(Clash())


def _shard_cotrained(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Plans (collectively) and shards :class:`CoTrained`, looks up the same ids in both sub-models."""
    model = CoTrained(torch.device("meta"))
    sharders = build_sharders()
    cfg = ShardingConfig(
        tables={"t_item_id__a": TableShardingConfig(sharding_types=["row_wise"])}, default_sharding_types=["table_wise"]
    )
    sharding_plan = plan(model, cfg, {}, build_topology(world_size, world_size, CPU), sharders)
    torch.manual_seed(rank)
    dmp = shard_model(model, sharding_plan, sharders, CPU)
    ids = torch.tensor([[1, 20, 3], [11, 10, 0]][rank])
    kjt = KeyedJaggedTensor(
        keys=["item_id", "hist_item_id"], values=torch.cat([ids[:1], ids]), lengths=torch.tensor([1, len(ids)])
    )
    a, b = dmp(kjt)
    full = gather_full_state(dmp)
    return {
        "a": a.detach(),
        "b": b.detach(),
        "table_a": full[next(k for k in full if k.endswith(".t_item_id__a.weight"))][ids],
        "table_b": full[next(k for k in full if k.endswith(".t_item_id__b.weight"))][ids],
        "types": {t: ps.sharding_type for mp in sharding_plan.plan.values() for t, ps in mp.items()},
        "sharded": sorted((n, t.module_path) for n, t in embedding_tables(dmp).items()),
    }


@pytest.mark.dist
def test_cotrained_model_shards_in_two_ranks_with_one_plan() -> None:
    for r in run_workers(_shard_cotrained, world_size=2):
        assert r["types"] == {"t_item_id__a": "row_wise", "t_item_id__b": "table_wise"}
        assert [n for n, _ in r["sharded"]] == ["t_item_id__a", "t_item_id__b"]
        # Each sub-model reads its own table (16 and 8 wide), whichever rank holds the rows.
        assert r["a"].shape == (3, 16) and r["b"].shape == (3, 8)
        torch.testing.assert_close(r["a"], r["table_a"], rtol=0, atol=0)
        torch.testing.assert_close(r["b"], r["table_b"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- plan files


def _handmade_plan() -> ShardingPlan:
    """Every field plan_to_json writes, with non-default values (CUDA placements, caching, enums)."""
    ec = EmbeddingModuleShardingPlan()
    ec["t_item"] = ParameterSharding(
        sharding_type="row_wise",
        compute_kernel="fused_uvm_caching",
        ranks=[0, 1],
        sharding_spec=EnumerableShardingSpec(
            [ShardMetadata([0, 0], [11, 8], "rank:0/cuda:0"), ShardMetadata([11, 0], [10, 8], "rank:1/cuda:1")]
        ),
        cache_params=CacheParams(
            algorithm=CacheAlgorithm.LFU, load_factor=0.2, precision=DataType.FP16, prefetch_pipeline=True
        ),
        enforce_hbm=False,
        stochastic_rounding=True,
        bounds_check_mode=BoundsCheckMode.WARNING,
        output_dtype=DataType.BF16,
    )
    ebc = EmbeddingModuleShardingPlan()
    ebc["t_user"] = ParameterSharding(sharding_type="data_parallel", compute_kernel="dense", ranks=[0, 1])
    return ShardingPlan(plan={"model.ec": ec, "model.ebc": ebc})


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    p = _handmade_plan()
    d = plan_to_json(p)
    assert d["model.ec"]["t_item"]["shards"][1] == {
        "shard_offsets": [11, 0],
        "shard_sizes": [10, 8],
        "placement": "rank:1/cuda:1",
    }
    assert d["model.ec"]["t_item"]["cache_params"]["algorithm"] == "LFU"
    assert (d["model.ec"]["t_item"]["table"], d["model.ec"]["t_item"]["role"]) == ("item", None)
    back = plan_from_json(json.loads(json.dumps(d)))
    assert back == p and plan_to_json(back) == d
    write_plan(tmp_path, p)
    assert read_plan(tmp_path / "plan.json") == p
    assert (tmp_path / "plan.txt").read_text() == plan_table(p)
    # Any change is visible to the comparison the test relies on.
    d["model.ec"]["t_item"]["shards"][1]["placement"] = "rank:0/cuda:0"
    assert plan_from_json(d) != p


def test_json_rejects_unknown_keys_and_types() -> None:
    d = plan_to_json(_handmade_plan())
    d["model.ebc"]["t_user"]["sharding"] = "x"
    with pytest.raises(ValueError, match=r"model.ebc.t_user: unknown keys \['sharding'\]"):
        plan_from_json(d)
    d = plan_to_json(_handmade_plan())
    d["model.ebc"]["t_user"]["sharding_type"] = "diagonal"
    with pytest.raises(ValueError, match=r"unknown sharding type \['diagonal'\]"):
        plan_from_json(d)
    d = plan_to_json(_handmade_plan())
    d["model.ebc"]["t_user"]["role"] = "attn"
    with pytest.raises(ValueError, match=r"model.ebc.t_user: states table 'user', role 'attn'"):
        plan_from_json(d)
    d = plan_to_json(_handmade_plan())  # a plan written before table / role were: still read
    for tables in d.values():
        for t in tables.values():
            del t["table"], t["role"]
    assert plan_from_json(d) == _handmade_plan()
    bad = _handmade_plan()
    bad.plan["model.ebc"]["user"] = bad.plan["model.ebc"].pop("t_user")
    with pytest.raises(ValueError, match=r"model.ebc.user: 'user' is not a table name"):
        plan_to_json(bad)


def test_loaded_plan_is_checked_against_model(tmp_path: Path) -> None:
    good = _plan_2_ranks(ShardingConfig(default_sharding_types=["row_wise"]))
    path = tmp_path / "plan.json"

    def load(d: dict, cfg: ShardingConfig | None = None) -> ShardingPlan:
        path.write_text(json.dumps(d))
        cfg = cfg or ShardingConfig()
        cfg.plan_path = str(path)
        return _plan_2_ranks(cfg)

    assert load(plan_to_json(good)) == good
    with pytest.raises(ValueError, match=r"cannot read the sharding plan.*FileNotFoundError.*nowhere.json"):
        _plan_2_ranks(ShardingConfig(plan_path=str(tmp_path / "nowhere.json")))

    d = plan_to_json(good)
    del d["model.ec"]["t_category"]
    with pytest.raises(ValueError, match=r"missing from the plan: \['t_category'\]"):
        load(d)
    d = plan_to_json(good)  # a plan for a smaller t_item (e.g. another dataset)
    d["model.ec"]["t_item"]["shards"][1]["shard_sizes"] = [5, 8]
    with pytest.raises(ValueError, match=r"t_item: shards cover 128 elements, the table has 21 x 8"):
        load(d)
    d = plan_to_json(good)  # a plan for 4 ranks
    d["model.ec"]["t_item"]["ranks"] = [0, 3]
    d["model.ec"]["t_item"]["shards"][1]["placement"] = "rank:3/cpu"
    with pytest.raises(ValueError, match=r"outside world size 2"):
        load(d)
    d = plan_to_json(good)
    d["model.ebc"]["t_item"] = d["model.ec"].pop("t_item")
    with pytest.raises(ValueError, match=r"t_item: planned under module 'model.ebc'"):
        load(d)
    with pytest.raises(ValueError, match=r"t_user: sharding type 'row_wise' is not among the allowed \['table_wise'\]"):
        load(plan_to_json(good), ShardingConfig(tables={"t_user": TableShardingConfig(sharding_types=["table_wise"])}))


def test_plan_table_text() -> None:
    p = _plan_2_ranks(
        ShardingConfig(
            tables={
                "t_item": TableShardingConfig(sharding_types=["row_wise"]),
                "t_category": TableShardingConfig(sharding_types=["table_wise"]),
                "t_user": TableShardingConfig(sharding_types=["data_parallel"]),
            }
        )
    )
    text = plan_table(p, embedding_tables(_meta_model()))
    lines = text.splitlines()
    assert lines[0].split() == [
        "module", "name", "table", "role", "rows", "dim", "dtype", "sharding", "kernel", "ranks", "shards",
        "bytes/rank",
    ]
    item = next(line for line in lines if " t_item " in line).split()
    assert item == [
        "model.ec", "t_item", "item", "-", "21", "8", "fp32", "row_wise", "fused", "0,1", "0:11x8", "1:10x8", "0:352",
        "1:320",
    ]
    user = next(line for line in lines if " t_user " in line).split()
    assert user[:10] == ["model.ebc", "t_user", "user", "-", "15", "8", "fp32", "data_parallel", "dense", "0,1"]
    assert user[10:] == ["all:15x8", "0:480", "1:480"]  # a replica on each rank
    category_rank = next(line for line in lines if " t_category " in line).split()[9]
    total = lines[-1].split()
    per_rank = {0: 352 + 480, 1: 320 + 480}
    per_rank[int(category_rank)] += 12 * 8 * 4
    assert total == ["total", f"0:{per_rank[0]}", f"1:{per_rank[1]}"]
    # Without table metadata the sizes come from the shards; a module or DMP is accepted instead of metadata.
    assert " t_item " in plan_table(p) and plan_table(p, _meta_model()) == text
