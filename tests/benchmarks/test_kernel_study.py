"""The kernel study's pure helpers (rates, ratios, the bwd fit, tables, profile categories), the planner's
kernel for the sequence tables on CPU, and the parity behind its proposal (EmbeddingCollection vs one-id bags
give the same losses and tables). No timings."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.embedding_lookup import SequenceLookup
from benchmarks.kernel_parity import compare
from benchmarks.kernel_profile import category, shares
from benchmarks.kernel_study import BagLookup, bwd_fit, format_table, one_id_bags, pivot, rates, relative
from launch.sharding import ShardingConfig, build_sharders, build_topology, plan
from tests.dist.runner import run_workers


def _point(variant: str, frac: float, ranks: int = 1, ids: int = 8192, bwd_ms: float = 1.0, distinct: float = 1.0):
    return {"variant": variant, "ranks": ranks, "sharding": "table_wise", "rows": 1000, "zipf": 1.05, "ids": ids, "frac": frac,
            "bwd_ms": bwd_ms, "distinct": distinct}


def test_one_id_bags_keeps_ids_with_lengths_of_one():
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([5, 6, 7, 1, 2, 3]),
                                              lengths=torch.tensor([2, 1, 3, 0], dtype=torch.int32))
    bags = one_id_bags(kjt)
    assert bags.keys() == ["a", "b"]
    assert bags.values().tolist() == [5, 6, 7, 1, 2, 3]
    assert bags.lengths().tolist() == [1] * 6
    assert bags.length_per_key() == [3, 3]
    uneven = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.arange(3),
                                                 lengths=torch.tensor([2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"equal ids per feature.*'a': 2, 'b': 1"):
        one_id_bags(uneven)


def test_rates_definitions():
    med = {"fwd": 0.01, "bwd": 0.03, "memcpy": 0.02, "index_select": 0.005, "index_add": 0.01}
    r = rates(med, rows_bytes=1e8, copy_bytes=1e8)
    assert r["fwd"] == pytest.approx(10.0) and r["bwd"] == pytest.approx(1e8 / 0.03 / 1e9)
    assert r["fwdbwd"] == pytest.approx(5.0)  # 2 x rows bytes over fwd + bwd
    assert r["memcpy"] == pytest.approx(5.0) and r["frac"] == pytest.approx(1.0)
    assert r["index_select"] == pytest.approx(20.0) and r["index_add"] == pytest.approx(10.0)
    assert r["fwd_ms"] == pytest.approx(10.0) and r["bwd_ms"] == pytest.approx(30.0)


def test_relative_divides_by_the_baseline_at_the_same_point():
    pts = [_point("ec/fused/sgd", 0.1), _point("bags/fused/sgd", 0.3), _point("bags/fused/sgd", 0.2, ranks=2),
           {**_point("bags/dense/sgd", 0.05), "sharding": "data_parallel"}]
    out = relative(pts)
    assert [r["vs_base"] for r in out[:2]] == [pytest.approx(1.0), pytest.approx(3.0)]
    assert out[2]["vs_base"] is None  # no baseline at 2 ranks
    assert out[3]["vs_base"] == pytest.approx(0.5)  # data-parallel beside the 1-rank table-wise baseline


def test_bwd_fit_recovers_per_id_and_per_row_costs():
    pts = [_point("v", 0.1, ids=i, distinct=d, bwd_ms=1e-3 * i + 5e-4 * d + 2.0)
           for i, d in ((8192, 3000), (65536, 9000), (8192, 8000), (65536, 60000), (30000, 20000))]
    pts.append(_point("v", 0.1, ranks=2, ids=10, distinct=10, bwd_ms=999.0))  # 2-rank points are not fitted
    pts.append({**_point("v", 0.1, ids=10, distinct=10, bwd_ms=999.0), "rows": 10})  # nor other table sizes
    f = bwd_fit(pts, "v", 1000)
    assert f["ns_per_id"] == pytest.approx(1000.0, rel=1e-6)
    assert f["ns_per_distinct"] == pytest.approx(500.0, rel=1e-6)
    assert f["c_ms"] == pytest.approx(2.0, abs=1e-6) and f["r2"] == pytest.approx(1.0)
    assert bwd_fit(pts[:3], "v", 1000) is None and bwd_fit(pts, "v", 10) is None


def test_pivot_and_format_table():
    pts = [_point("a", 0.125), _point("b", 0.5), _point("a", 0.25, ids=65536)]
    cols, body = pivot(pts, "frac", ["a", "b"])
    assert cols == ["ranks", "sharding", "rows", "zipf", "ids", "a", "b"]
    assert body == [["1", "table_wise", "1e+03", "1.05", "8192", "0.125", "0.500"],
                    ["1", "table_wise", "1e+03", "1.05", "65536", "0.250", "-"]]
    text = format_table(["x", "long header"], [["ab", "1"]]).splitlines()
    assert text == ["x   long header", "--  -----------", "ab            1"]


def test_profile_categories():
    assert category("fbgemm::split_embedding_nobag_backward_codegen_sgd_cpu") == "tbe backward"
    assert category("fbgemm::split_embedding_codegen_forward_cpu") == "tbe forward"
    assert category("torch::autograd::CppNode<SplitNoBagLookupFunction_sgd_Op_pt2>") == "autograd"  # "baGLOOkup"
    assert category("All2All_Seq_ReqBackward") == "communication"
    assert category("ReduceScatterBase_Wait") == "communication"
    assert category("## all2all_data:recat_permute_gen ##") == "torchrec python"
    assert category("aten::cat") == "tensor glue" and category("aten::scatter_add_") == "other"
    s = shares({"fbgemm::split_embedding_backward_codegen_sgd_cpu": 30.0, "aten::cat": 10.0, "x": 10.0})
    assert list(s) == ["tbe backward", "tensor glue", "other"]
    assert s["tbe backward"] == pytest.approx(0.6) and sum(s.values()) == pytest.approx(1.0)
    assert shares({}) == {}


@pytest.mark.parametrize("module", [SequenceLookup, BagLookup])
def test_planner_picks_fused_for_sequence_tables_on_cpu(module):
    """The kernel the study measured fastest among those that run (dense: refused for ec, slower for bags)."""
    model = module({"hist_item_id": 1000, "hist_category": 100}, 16, torch.device("meta"))
    cfg = ShardingConfig(batch_size=64)
    sharding_plan = plan(model, cfg, {}, build_topology(1, 1, torch.device("cpu"), cfg), build_sharders(), pg=None)
    kernels = {t: ps.compute_kernel for mp in sharding_plan.plan.values() for t, ps in mp.items()}
    assert kernels == {"t_hist_item_id": "fused", "t_hist_category": "fused"}


def _parity(rank: int, world: int) -> list[dict]:
    return compare(rank, world, ("sgd", "rowwise_adagrad"), steps=12, rows=300, dim=8, b=16, seq_len=4,
                   sharding="table_wise" if world == 1 else "row_wise")


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_ec_and_one_id_bags_train_to_the_same_tables(world):
    res = run_workers(_parity, world_size=world, timeout_s=300)[0]
    assert [r["optimizer"] for r in res] == ["sgd", "rowwise_adagrad"]
    for r in res:
        assert r["rows_updated"] > 50  # training moved many rows: the comparison is not vacuous
        assert r["loss_diff"] < 1e-6, r
        assert r["weight_diff"] < 1e-6, r
        assert r["loss_first"] == pytest.approx(0.6931, abs=2e-3)  # zero-bias head on small weights
