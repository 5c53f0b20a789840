"""Single-process tests of launch/sharding.py: constraint merging and validation, planning without a process
group, plan JSON round trip, plan checks on load, and the text table. Multi-process tests: tests/dist/."""

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
    read_plan,
    write_plan,
)
from models.registry import TableConstraint
from tests.dist.reference_model import build_reference_train_module

TABLES = ["t_item", "t_category", "t_user"]
CPU = torch.device("cpu")


def _meta_model() -> torch.nn.Module:
    return build_reference_train_module(torch.device("meta"))


def _plan_2_ranks(cfg: ShardingConfig, defaults: dict | None = None) -> ShardingPlan:
    """Plans the reference model for 2 CPU ranks in this one process (no process group)."""
    return plan(_meta_model(), cfg, defaults or {}, build_topology(2, 2, CPU), build_sharders())


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
    assert lines[0].split() == ["module", "table", "rows", "dim", "sharding", "kernel", "ranks", "shards", "bytes/rank"]
    item = next(line for line in lines if " t_item " in line).split()
    assert item == ["model.ec", "t_item", "21", "8", "row_wise", "fused", "0,1", "0:11x8", "1:10x8", "0:352", "1:320"]
    user = next(line for line in lines if " t_user " in line).split()
    assert user[:7] == ["model.ebc", "t_user", "15", "8", "data_parallel", "dense", "0,1"]
    assert user[7:] == ["all:15x8", "0:480", "1:480"]  # a replica on each rank
    category_rank = next(line for line in lines if " t_category " in line).split()[6]
    total = lines[-1].split()
    per_rank = {0: 352 + 480, 1: 320 + 480}
    per_rank[int(category_rank)] += 12 * 8 * 4
    assert total == ["total", f"0:{per_rank[0]}", f"1:{per_rank[1]}"]
    # Without table metadata the sizes come from the shards; a module or DMP is accepted instead of metadata.
    assert " t_item " in plan_table(p) and plan_table(p, _meta_model()) == text
