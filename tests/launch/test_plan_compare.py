"""python -m launch.plan_compare: candidates parsed and merged over sharding.tables, bad ones refused, the
planner's figures per candidate (the same as plan_cluster's for the same constraints), and --measure on 1 rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config
from launch.plan_cluster import plan_cluster
from launch.plan_compare import candidate_shardings, compare, main

ROOT = Path(__file__).resolve().parents[2]
DIN = ROOT / "configs/tests/din_tiny.yaml"
DIN_TABLES = ["t_user_id", "t_item_id", "t_item_category"]
DARE = ROOT / "configs/tests/dare_tiny.yaml"
CLUSTER = ["optim.sparse=adam", "sharding.cluster.world_size=4", "sharding.cluster.local_world_size=2",
           "sharding.cluster.device=cuda", "sharding.cluster.hbm_gib=80", "sharding.cluster.ddr_gib=512"]
ROWS = ["item_id=1e8"]


def _candidate(name: str, table: str, sharding_type: str, prefix: str = "sharding.candidates") -> str:
    return f"{prefix}.{name}.tables.{table}.sharding_types=[{sharding_type}]"


def test_candidates_replace_the_entries_they_name_and_keep_the_others():
    cfg, _, _ = load_config(DIN, [
        "sharding.tables.t_item_id.compute_kernels=[fused]", "sharding.tables.t_user_id.sharding_types=[table_wise]",
        _candidate("rw", "t_item_id", "row_wise"), "sharding.candidates.rw.tables.t_item_category.precision=fp16",
    ])
    rw = candidate_shardings(cfg.sharding, DIN_TABLES)["rw"]
    assert list(rw.tables) == ["t_item_id", "t_user_id", "t_item_category"] and rw.candidates == {}
    # The candidate's whole entry replaces the base's (its compute_kernels is not kept); the base's t_user_id stays.
    assert rw.tables["t_item_id"].sharding_types == ["row_wise"] and rw.tables["t_item_id"].compute_kernels == []
    assert rw.tables["t_user_id"].sharding_types == ["table_wise"] and rw.tables["t_item_category"].precision == "fp16"
    assert cfg.sharding.tables["t_item_id"].compute_kernels == ["fused"]  # the config itself is untouched


@pytest.mark.parametrize("overrides, message", [
    ([], r"sharding.candidates is empty: name at least one candidate"),
    ([_candidate("bad", "t_nope", "row_wise")],
     r"sharding.candidates.bad.tables name tables the model does not have: \['t_nope'\]"),
    ([_candidate("x", "t_item_id", "diagonal")],
     r"sharding.candidates.x.tables.t_item_id.sharding_types: unknown sharding type \['diagonal'\]"),
    (["sharding.candidates.q.tables.t_item_id.precision=int8"],
     r"sharding.candidates.q: sharding: sharding.tables.t_item_id.precision=int8 \(tables \['t_item_id'\]\)"),
    (["sharding.candidates.x.tabels.t_item_id.sharding_types=[row_wise]"],
     r"unknown config key 'sharding.candidates.x.tabels'"),
    ([_candidate("a+b", "t_item_id", "row_wise")], r"sharding.candidates: 'a\+b' is not a plain name"),
    ([_candidate("ok", "t_item_id", "row_wise"), "sharding.plan_path=x.json"], r"drop sharding.plan_path"),
])
def test_bad_candidates_are_config_errors(overrides, message, tmp_path, capsys):
    if any("plan_path" in o for o in overrides):  # a plan file that exists: refused for what it means here
        (tmp_path / "x.json").write_text(json.dumps({}))
        overrides = [o.replace("x.json", str(tmp_path / "x.json")) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        compare(DIN, overrides, nproc=2)
    assert main(["--config", str(DIN), "--out-dir", str(tmp_path / "out"), *overrides]) == 2
    assert capsys.readouterr().err.startswith("config error: ")
    assert not (tmp_path / "out").exists()


def test_two_candidates_report_the_planners_choices_and_costs_as_plan_cluster_does(tmp_path, capsys):
    """Two candidates differing only in the representation table's sharding type, planned for a 4-GPU cluster:
    each reports that type, and its per-rank storage, costs and bottleneck are plan_cluster's for the same
    constraints."""
    cands = [_candidate("rw", "t_item_id__repr", "row_wise"), _candidate("tw", "t_item_id__repr", "table_wise")]
    assert main(["--config", str(DARE), "--cluster", "--table-rows", *ROWS, "--out-dir", str(tmp_path),
                 *CLUSTER, *cands]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())
    rw, tw = report["candidates"]["rw"], report["candidates"]["tw"]
    assert report["target"]["source"] == "sharding.cluster" and report["target"]["world_size"] == 4
    assert rw["tables"]["t_item_id__repr"]["sharding_type"] == "row_wise"
    assert tw["tables"]["t_item_id__repr"]["sharding_type"] == "table_wise"
    assert len(tw["tables"]["t_item_id__repr"]["ranks"]) == 1 and rw["tables"]["t_item_id__repr"]["ranks"] == [0, 1, 2, 3]
    for name, sharding_type in (("rw", "row_wise"), ("tw", "table_wise")):
        alone = plan_cluster(DARE, CLUSTER + [f"sharding.tables.t_item_id__repr.sharding_types=[{sharding_type}]"], ROWS)
        got = report["candidates"][name]
        assert got["ranks"] == alone["ranks"] and got["bottleneck_rank"] == alone["bottleneck_rank"]
        assert got["plan"] == alone["plan"]
        assert got["bottleneck_cost_ms"] == max(r["cost_ms"] for r in alone["ranks"]) > 0
        assert json.loads((tmp_path / name / "plan.json").read_text()) == alone["plan"]
    # A 1e8 x 8 table on one rank holds more there than spread row-wise over four.
    assert max(r["hbm_bytes"] for r in tw["ranks"]) > max(r["hbm_bytes"] for r in rw["ranks"])
    lines = printed.splitlines()
    assert lines[0] == "dare: 2 candidates planned for 4 cuda ranks (2 hosts x 2, sharding.cluster)"
    assert lines[1].split() == ["rw", "tw"]
    repr_line = next(x for x in lines if x.startswith("t_item_id__repr ")).split()
    assert repr_line == ["t_item_id__repr", "row_wise", "fused", "table_wise", "fused"]
    bottleneck = next(x for x in lines if x.startswith("bottleneck"))
    assert f"rank {rw['bottleneck_rank']}: {rw['bottleneck_cost_ms']:.4f} ms" in bottleneck
    assert f"rank {tw['bottleneck_rank']}: {tw['bottleneck_cost_ms']:.4f} ms" in bottleneck
    assert any(x.startswith("HBM GiB/rank") for x in lines) and "step ms" not in printed


def test_measure_and_cluster_together_are_refused(tmp_path, capsys):
    assert main(["--config", str(DIN), "--cluster", "--measure", _candidate("rw", "t_item_id", "row_wise")]) == 2
    assert "drop --cluster to measure" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from datasets.synthetic import SyntheticParams, generate

    out = tmp_path_factory.mktemp("synthetic_tiny")
    generate(out, SyntheticParams(num_samples=1024, num_eval_samples=256, num_users=200, num_items=1000,
                                  num_categories=50, max_seq_len=100, files=1, row_group_size=256, seed=0))
    return out


def test_measure_trains_each_candidates_plan_on_one_rank(tiny_data, tmp_path, capsys):
    data = [f"data.train_paths=[{tiny_data}/train/*.parquet]", f"data.eval_paths=[{tiny_data}/eval/*.parquet]"]
    cands = [_candidate("tw", "t_item_id", "table_wise"), _candidate("rw", "t_item_id", "row_wise"),
             "sharding.candidates.rw.tables.t_user_id.precision=fp16"]
    assert main(["--config", str(DIN), "--nproc", "1", "--measure", "--steps", "3", "--out-dir", str(tmp_path),
                 *data, *cands]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())
    for name, sharding_type in (("tw", "table_wise"), ("rw", "row_wise")):
        m = report["candidates"][name]["measured"]
        assert m["steps"] == 3 and m["median_step_ms"] > 0 and m["mean_step_ms"] > 0, m
        # The run trained the candidate's plan: its plan.json is the compared one (the trainer's may not state
        # precisions).
        def placements(plan: dict) -> dict:
            return {mp: {t: {k: v for k, v in e.items() if k != "precision"} for t, e in ts.items()}
                    for mp, ts in plan.items()}

        ran = json.loads((Path(m["run_dir"]) / "plan.json").read_text())
        assert placements(report["candidates"][name]["plan"]) == placements(ran)
        assert report["candidates"][name]["tables"]["t_item_id"]["sharding_type"] == sharding_type
    # The fp16 entry reached the trained model: its plan.txt lists t_user_id in fp16.
    text = (Path(report["candidates"]["rw"]["measured"]["run_dir"]) / "plan.txt").read_text()
    assert next(x for x in text.splitlines() if " t_user_id " in x).split()[6] == "fp16"
    assert "step ms (median of 2)" in printed
