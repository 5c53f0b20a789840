"""Per-table precision (``sharding.tables.<key>.precision``): fp16 applied to the model's tables before planning
(weights, the planner's storage estimate, the plan text and JSON), the JSON round trip through ``plan_path``,
``python -m launch.plan_cluster``, and int8 / unknown names refused. Training in fp16: tests/dist/test_precision.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrec.types import DataType

from launch.config import ConfigError, load_config, validate_experiment
from launch.plan_cluster import main as plan_cluster_main
from launch.plan_cluster import plan_cluster
from launch.sharding import (
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_tables,
    merge_constraints,
    plan,
    plan_table,
    plan_to_json,
)
from tests.dist.reference_model import build_reference_train_module

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
FP16_ITEM = {"t_item": TableShardingConfig(sharding_types=["row_wise"], precision="fp16")}


def _plan(cfg: ShardingConfig) -> tuple[torch.nn.Module, object]:
    model = build_reference_train_module(torch.device("meta"))
    return model, plan(model, cfg, {}, build_topology(2, 2, CPU), build_sharders())


def test_fp16_entry_makes_the_table_fp16_before_planning():
    model, p = _plan(ShardingConfig(tables=FP16_ITEM))
    ec = model.model.ec
    assert ec.embeddings["t_item"].weight.dtype == torch.float16 and ec.embeddings["t_category"].weight.dtype == torch.float32
    assert [c.data_type for c in ec.embedding_configs()] == [DataType.FP16, DataType.FP32]
    tables = embedding_tables(model)
    assert tables["t_item"].bytes_per_element == 2 and tables["t_user"].bytes_per_element == 4
    line = next(x for x in plan_table(p, tables).splitlines() if " t_item " in x).split()
    # 21 rows x 8 fp16 split 11 + 10 rows: half the fp32 plan's 352 / 320 bytes.
    assert line[6] == "fp16" and line[-2:] == ["0:176", "1:160"]
    assert plan_to_json(p, tables)["model.ec"]["t_item"]["precision"] == "fp16"
    assert plan_to_json(p, tables)["model.ec"]["t_category"]["precision"] == "fp32"
    assert "precision" not in plan_to_json(p)["model.ec"]["t_item"]  # without tables: not stated


def test_plan_json_states_precision_and_a_mismatching_config_is_refused(tmp_path):
    model, p = _plan(ShardingConfig(tables=FP16_ITEM))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_to_json(p, embedding_tables(model))))
    again_model, again = _plan(ShardingConfig(tables=FP16_ITEM, plan_path=str(path)))
    assert again == p and again_model.model.ec.embeddings["t_item"].weight.dtype == torch.float16
    fp32 = {"t_item": TableShardingConfig(sharding_types=["row_wise"])}
    with pytest.raises(ValueError, match=r"t_item: the plan was made for fp16 rows, the model's table is fp32"):
        _plan(ShardingConfig(tables=fp32, plan_path=str(path)))


def test_int8_and_unknown_precisions_are_refused_naming_the_table():
    names = ["t_item", "t_category", "t_user"]
    int8 = ShardingConfig(tables={"t_*": TableShardingConfig(precision="int8")})
    with pytest.raises(ValueError) as e:
        merge_constraints({}, int8, names)
    assert str(e.value) == (
        "sharding.tables.t_*.precision=int8 (tables ['t_item', 't_category', 't_user']): torchrec trains embedding"
        " tables in fp32 or fp16 only (int8 tables are inference-only, torchrec.quant); supported: ['fp32', 'fp16']"
    )
    bad = ShardingConfig(tables={"t_user": TableShardingConfig(precision="bf8")})
    with pytest.raises(ValueError, match=r"sharding.tables.t_user.precision: unknown precision \['bf8'\]; valid"
                                         r" values: \['fp32', 'fp16', 'int8'\]"):
        merge_constraints({}, bad, names)
    # Before any process exists: python -m launch.train exits 2 with it.
    cfg, spec, _ = load_config(ROOT / "configs/tests/din_tiny.yaml", ["sharding.tables.t_item_id.precision=int8"])
    with pytest.raises(ConfigError, match=r"sharding: sharding.tables.t_item_id.precision=int8 \(tables \['t_item_id'\]\)"):
        validate_experiment(cfg, spec)


DARE = ROOT / "configs/tests/dare_tiny.yaml"
CLUSTER = ["optim.sparse=sgd", "sharding.cluster.world_size=4", "sharding.cluster.local_world_size=2",
           "sharding.cluster.device=cuda", "sharding.cluster.hbm_gib=80", "sharding.cluster.ddr_gib=512",
           "sharding.tables.t_item_id__repr.sharding_types=[row_wise]"]


def test_plan_cluster_sizes_fp16_shards_at_half_the_bytes(tmp_path, capsys):
    fp32 = plan_cluster(DARE, CLUSTER, ["item_id=1e9"])
    fp16 = plan_cluster(DARE, CLUSTER + ["sharding.tables.t_item_id__repr.precision=fp16"], ["item_id=1e9"])
    assert fp16["tables"]["t_item_id__repr"] == {"rows": 10**9, "dim": 8, "precision": "fp16"}
    assert fp16["plan"]["model.items.repr"]["t_item_id__repr"]["precision"] == "fp16"
    # Row-wise over 4 ranks: 2.5e8 rows x 8 per rank; the planner's storage of the table (weights: SGD keeps no
    # state) drops from 4 to 2 bytes a row element, on every rank; the rest of the plan is the same.
    rows = 10**9 // 4
    for a, b in zip(fp32["ranks"], fp16["ranks"]):
        assert a["hbm_bytes"] - b["hbm_bytes"] == pytest.approx(rows * 8 * 2, rel=1e-5)
    assert [r["shards"] for r in fp16["ranks"]] == [r["shards"] for r in fp32["ranks"]]
    # The JSON loads back as a pinned plan for the fp16 config, not for the fp32 one.
    pinned = tmp_path / "plan.json"
    pinned.write_text(json.dumps(fp16["plan"]))
    again = plan_cluster(DARE, CLUSTER + ["sharding.tables.t_item_id__repr.precision=fp16",
                                          f"sharding.plan_path={pinned}"], ["item_id=1e9"])
    assert again["plan"] == fp16["plan"] and not again["planned"]
    assert plan_cluster_main(["--config", str(DARE), "--table-rows", "item_id=1e9", "--out", str(tmp_path / "x.json"),
                              *CLUSTER, f"sharding.plan_path={pinned}"]) == 2
    assert "t_item_id__repr: the plan was made for fp16 rows, the model's table is fp32" in capsys.readouterr().err
    assert plan_cluster_main(["--config", str(DARE), "--out", str(tmp_path / "x.json"), *CLUSTER,
                              "sharding.tables.t_item_id__repr.precision=int8"]) == 2
    assert "precision=int8 (tables ['t_item_id__repr'])" in capsys.readouterr().err


def test_precision_with_replicated_tables_is_refused():
    cfg, spec, _ = load_config(ROOT / "configs/tests/din_tiny.yaml",
                               ["sharding.tables.t_item_id.precision=fp16", "optim.sparse=replicated_adam"])
    with pytest.raises(ConfigError, match=r"optim: sharding.tables \['t_item_id'\] set a precision, but"
                                          r" optim.sparse=replicated_adam trains fp32 tables"):
        validate_experiment(cfg, spec)
