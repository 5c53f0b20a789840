"""Plan save / load in 2 gloo ranks: JSON round trip of a planned plan, reuse through ``plan_path``, and a
model sharded with the loaded plan trains (TrainPipelineSparseDist) with exactly the loaded shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from launch.sharding import (
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    embedding_tables,
    plan,
    plan_from_json,
    plan_table,
    plan_to_json,
    shard_model,
    write_plan,
)
from tests.dist.parity import gather_full_state
from tests.dist.reference_model import build_reference_train_module, make_reference_batch
from tests.dist.runner import run_workers

pytestmark = pytest.mark.dist

MIXED = ShardingConfig(
    tables={
        "t_item": TableShardingConfig(sharding_types=["row_wise"]),
        "t_category": TableShardingConfig(sharding_types=["column_wise"], min_partition=4),
        "t_user": TableShardingConfig(sharding_types=["table_wise"]),
    }
)


def _roundtrip(rank: int, world_size: int, run_dir: str) -> dict:
    device = torch.device("cpu")
    sharders = build_sharders()
    topology = build_topology(world_size, world_size, device)
    model = build_reference_train_module(torch.device("meta"))
    tables = embedding_tables(model)
    planned = plan(model, MIXED, {}, topology, sharders)
    assert {t: ps.sharding_type for mp in planned.plan.values() for t, ps in mp.items()} == {
        "t_item": "row_wise",
        "t_category": "column_wise",
        "t_user": "table_wise",
    }

    as_json = plan_to_json(planned)
    decoded = plan_from_json(json.loads(json.dumps(as_json)))
    assert decoded == planned
    assert plan_to_json(decoded) == as_json
    # Our format is a superset of torchrec's own serialisation.
    theirs = planned._serialize()["plan"]
    for module_path, module_tables in theirs.items():
        for table, t in module_tables.items():
            for key in ("sharding_type", "compute_kernel", "ranks", "shards"):
                assert as_json[module_path][table][key] == t[key], (table, key)

    text = plan_table(planned, tables)
    if rank == 0:
        write_plan(run_dir, planned, text)
    dist.barrier()

    # Reuse: every rank loads the plan that rank 0 wrote, for a fresh model.
    model = build_reference_train_module(torch.device("meta"))
    loaded = plan(model, ShardingConfig(plan_path=str(Path(run_dir) / "plan.json")), {}, topology, sharders)
    assert loaded == planned
    apply_optimizer_in_backward(torch.optim.Adagrad, embedding_parameters(model), {"lr": 0.1})
    torch.manual_seed(rank)
    dmp = shard_model(model, loaded, sharders, device)

    # The loaded plan is what DMP applied: this rank's shards are the plan's shards placed on this rank.
    state = dmp.state_dict()
    for module_path, module_plan in loaded.plan.items():
        for table, ps in module_plan.items():
            key = next(k for k in state if k.endswith(f".{table}.weight"))
            assert isinstance(state[key], ShardedTensor), key
            mine = sorted(
                (list(s.shard_offsets), list(s.shard_sizes))
                for s in ps.sharding_spec.shards
                if s.placement.rank() == rank
            )
            got = sorted(
                (list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in state[key].local_shards()
            )
            assert got == mine, (table, got, mine)

    assert plan_table(loaded, dmp) == text  # table metadata read from the sharded modules

    before = gather_full_state(dmp)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    batches = iter([make_reference_batch(rank, world_size, seed=s) for s in range(3)])
    losses = [float(pipeline.progress(batches).loss) for _ in range(3)]
    after = gather_full_state(dmp)
    changed = sorted(
        t for t in tables if any(k.endswith(f".{t}.weight") and not torch.equal(before[k], after[k]) for k in after)
    )
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert changed == sorted(tables), f"tables trained: {changed}"
    return {"losses": losses, "text": text}


def test_plan_json_roundtrip_and_reuse(tmp_path: Path) -> None:
    results = run_workers(_roundtrip, world_size=2, args=(str(tmp_path),))
    written = json.loads((tmp_path / "plan.json").read_text())
    assert set(written) == {"model.ec", "model.ebc"}
    assert set(written["model.ec"]) == {"t_item", "t_category"}
    text = (tmp_path / "plan.txt").read_text()
    assert text == results[0]["text"]
    # t_item: 21 rows x 8 fp32 split 11 + 10 rows; t_category: 12 x 8 split into two 12 x 4 columns.
    item_line = next(line for line in text.splitlines() if " t_item " in line)
    assert "0:11x8 1:10x8" in item_line and "0:352 1:320" in item_line, item_line
    category_line = next(line for line in text.splitlines() if " t_category " in line)
    assert "0:12x4 1:12x4" in category_line and "0:192 1:192" in category_line, category_line
