"""Dry-run planning for a target cluster (python -m launch.plan_cluster): billion-row tables planned on meta for a
cluster this machine is not, the report's numbers, the JSON round trip as a pinned plan, and misfits refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.plan_cluster import main, plan_cluster

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/tests/dare_tiny.yaml"
CLUSTER = ["optim.sparse=adam", "sharding.cluster.world_size=4", "sharding.cluster.local_world_size=2", "sharding.cluster.device=cuda",
           "sharding.cluster.hbm_gib=80", "sharding.cluster.ddr_gib=512"]
BILLION = ["item_id=1e9"]


@pytest.fixture(scope="module")
def report() -> dict:
    return plan_cluster(CONFIG, CLUSTER, BILLION)


def test_billion_row_tables_are_planned_for_the_cluster_without_allocation(report):
    assert report["planned"] and report["cluster"]["world_size"] == 4
    assert report["tables"]["t_item_id__attn"]["rows"] == report["tables"]["t_item_id__repr"]["rows"] == 10**9
    # Every table of the model is placed; its shards cover its rows exactly, on ranks of the 4-rank cluster.
    placed = {name: ps for tables in report["plan"].values() for name, ps in tables.items()}
    assert set(placed) == set(report["tables"])
    for name, ps in placed.items():
        assert set(ps["ranks"]) <= {0, 1, 2, 3}
        if ps["sharding_type"] == "row_wise":
            assert sum(s["shard_sizes"][0] for s in ps["shards"]) == report["tables"][name]["rows"]
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    # The planner's storage: the weights of the two 1e9-row item tables (fp32) and fused Adam's two moments.
    dims = report["tables"]["t_item_id__attn"]["dim"] + report["tables"]["t_item_id__repr"]["dim"]
    assert sum(r["hbm_bytes"] + r["ddr_bytes"] for r in ranks) >= 3 * 10**9 * dims * 4
    assert all(r["hbm_bytes"] <= 80 * 1024**3 for r in ranks)
    assert report["bottleneck_rank"] == max(ranks, key=lambda r: r["cost_ms"])["rank"]
    assert all(r["cost_ms"] > 0 and r["shards"] > 0 for r in ranks)


def test_the_json_is_a_pinned_plan_that_loads_verbatim_and_misfits_are_refused(report, tmp_path, capsys):
    pinned = tmp_path / "plan.json"
    pinned.write_text(json.dumps(report["plan"]))
    again = plan_cluster(CONFIG, CLUSTER + [f"sharding.plan_path={pinned}"], BILLION)
    assert not again["planned"] and again["plan"] == report["plan"] and again["plan_text"] == report["plan_text"]
    # The same plan on a cluster of another size, or for tables of another size, is refused before allocation.
    assert main(["--config", str(CONFIG), "--table-rows", *BILLION, "--out", str(tmp_path / "x.json"),
                 *CLUSTER, "sharding.cluster.world_size=8", f"sharding.plan_path={pinned}"]) == 2
    assert "does not fit this cluster" in capsys.readouterr().err
    assert main(["--config", str(CONFIG), "--table-rows", "item_id=1e8", "--out", str(tmp_path / "x.json"),
                 *CLUSTER, f"sharding.plan_path={pinned}"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_a_cluster_too_small_and_bad_arguments_are_config_errors(tmp_path, capsys):
    out = tmp_path / "r.json"
    small = CLUSTER + ["sharding.cluster.hbm_gib=1", "sharding.cluster.ddr_gib=1"]
    assert main(["--config", str(CONFIG), "--table-rows", *BILLION, "--out", str(out), *small]) == 2
    assert "no sharding plan fits the cluster" in capsys.readouterr().err and not out.exists()
    assert main(["--config", str(CONFIG), "--table-rows", "nope=5", "--out", str(out), *CLUSTER]) == 2
    assert "no table 'nope'" in capsys.readouterr().err
    assert main(["--config", str(CONFIG), "--out", str(out), *CLUSTER, "sharding.cluster.local_world_size=3"]) == 2
    assert "multiple of local_world_size" in capsys.readouterr().err
    # The README's form: overrides right after --table-rows (one value per --table-rows).
    assert main(["--config", str(CONFIG), "--out", str(out), "--table-rows", "item_id=1e4", *CLUSTER]) == 0
    assert json.loads(out.read_text())["tables"]["t_item_id__attn"]["rows"] == 10**4
    # Replicated tables make no plan in training: refused here too.
    assert main(["--config", str(CONFIG), "--out", str(out), *CLUSTER, "optim.sparse=replicated_adam"]) == 2
    assert "replicated_adam" in capsys.readouterr().err


def test_uvm_caching_with_a_load_factor_from_config_moves_rows_out_of_hbm():
    """Per-table kernel and cache load factor (GPU clusters): the representation table on UVM caching with 10%
    of its rows in HBM takes about a tenth of the HBM it takes fully resident, the rest in DDR."""
    fused = plan_cluster(CONFIG, CLUSTER + ["sharding.tables.t_item_id__repr.compute_kernels=[fused]"], BILLION)
    cached = plan_cluster(CONFIG, CLUSTER + ["sharding.tables.t_item_id__repr.compute_kernels=[fused_uvm_caching]",
                                             "sharding.tables.t_item_id__repr.cache_load_factor=0.1"], BILLION)
    placed = {n: ps for t in cached["plan"].values() for n, ps in t.items()}
    assert placed["t_item_id__repr"]["compute_kernel"] == "fused_uvm_caching"
    hbm = lambda r: sum(x["hbm_bytes"] for x in r["ranks"])  # noqa: E731
    ddr = lambda r: sum(x["ddr_bytes"] for x in r["ranks"])  # noqa: E731
    assert hbm(cached) < 0.5 * hbm(fused) and ddr(cached) > ddr(fused)
    with pytest.raises(Exception, match="cache_load_factor"):
        plan_cluster(CONFIG, CLUSTER + ["sharding.tables.t_item_id__repr.cache_load_factor=1.5"], BILLION)
