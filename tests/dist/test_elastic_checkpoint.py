"""A checkpoint written by 2 gloo ranks loads on 1 and on 3 (DCP resharding), through the trainer's own code
paths (:func:`launch.optim.apply_sparse_optimizers`, :func:`launch.optim.build_optimizer`,
:func:`launch.checkpoint.save` / :func:`launch.checkpoint.load`): after the load every table, every dense
weight and every optimizer state tensor (the fused adagrad's accumulators, dense Adam's moments) assembled
from the new world's shards equals the one the 2 ranks saved, under plans that differ (row-wise over 3 ranks,
column-wise, table-wise)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from launch import checkpoint
from launch.optim import OptimConfig, apply_sparse_optimizers, build_optimizer
from launch.sharding import ShardingConfig, TableShardingConfig, build_sharders, build_topology, plan, shard_model
from tests.dist.parity import _slices, gather_full_state
from tests.dist.reference_model import build_reference_train_module, make_reference_batch
from tests.dist.runner import run_workers

pytestmark = pytest.mark.dist

PLANS = {
    2: {"t_item": "row_wise", "t_category": "table_wise", "t_user": "column_wise"},
    1: {"t_item": "table_wise", "t_category": "row_wise", "t_user": "table_wise"},
    3: {"t_item": "row_wise", "t_category": "column_wise", "t_user": "row_wise"},
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}/"))
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}/"))
    elif isinstance(d, (torch.Tensor, ShardedTensor)):
        out[prefix] = d
    return out


def _full(state: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) state, unsharded, on every rank. A fused optimizer's state of a table exists
    only on the ranks holding shards of it: the keys are the union over ranks; plain tensors are replicated."""
    mine = _flat(state)
    shapes: dict[str, tuple[list[int], torch.dtype, bool]] = {}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: (list(v.size()), v.dtype, isinstance(v, ShardedTensor))
                                      for k, v in mine.items()})
    for d in everyone:
        shapes.update(d)
    out = {}
    for key in sorted(shapes):
        size, dtype, sharded = shapes[key]
        t = mine.get(key)
        if not sharded:
            out[key] = t.detach().cpu().clone()
            continue
        full = torch.zeros(size, dtype=dtype)
        if t is not None:
            for shard in t.local_shards():
                full[_slices(shard.metadata.shard_offsets, shard.metadata.shard_sizes)] = shard.tensor.cpu()
        dist.all_reduce(full)
        out[key] = full
    return out


def _build(world: int):
    device = torch.device("cpu")
    model = build_reference_train_module(torch.device("meta"))
    cfg = OptimConfig()  # fused adagrad on the tables, Adam on the dense part
    apply_sparse_optimizers(model, cfg)
    sharders = build_sharders()
    types = PLANS[world]
    sharding = ShardingConfig(tables={
        t: TableShardingConfig(sharding_types=[s], min_partition=4 if s == "column_wise" else None)
        for t, s in types.items()
    })
    planned = plan(model, sharding, {}, build_topology(world, world, device), sharders)
    got = {t: ps.sharding_type for m in planned.plan.values() for t, ps in m.items()}
    assert got == types, got
    torch.manual_seed(dist.get_rank() + 100 * world)  # other initial weights than the writer's
    dmp = shard_model(model, planned, sharders, device)
    optimizer, dense = build_optimizer(dmp, cfg)
    return dmp, optimizer, dense


def _write(rank: int, world: int, root: str) -> dict:
    dmp, optimizer, _ = _build(world)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    batches = iter([make_reference_batch(rank, world, seed=s) for s in range(4)])
    for _ in range(4):
        pipeline.progress(batches)
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    checkpoint.save(Path(root), 4, state, checkpoint.CheckpointMeta(4, world, 4 * world * 8), keep=1)
    return {"model": gather_full_state(dmp), "optim": _full(optimizer.state_dict())}


def _read(rank: int, world: int, root: str) -> dict:
    dmp, optimizer, dense = _build(world)
    for opt in dense:  # as the trainer does: create the dense state so that the load fills it in place
        opt.init_state()
        opt.zero_grad(set_to_none=True)
    fresh = gather_full_state(dmp)
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    found = checkpoint.latest(Path(root))
    with pytest.raises(RuntimeError, match="written by 2 ranks, this run has"):
        checkpoint.load(found, state)  # not elastic: refused
    meta = checkpoint.load(found, state, elastic=True)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return {"meta": meta.world_size, "fresh": fresh, "model": gather_full_state(dmp),
            "optim": _full(optimizer.state_dict())}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("elastic") / "checkpoints")
    return root, run_workers(_write, world_size=2, args=(root,), timeout_s=240)[0]


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_loads_resharded(world: int, written: tuple[str, dict]) -> None:
    root, saved = written
    got = run_workers(_read, world_size=world, args=(root,), timeout_s=240)
    for r in got:
        assert r["meta"] == 2
        assert set(r["model"]) == set(saved["model"])
        for key, want in saved["model"].items():
            assert torch.equal(r["model"][key], want), key
        assert any(not torch.equal(r["fresh"][k], v) for k, v in saved["model"].items())  # the load changed them
        want_opt, got_opt = saved["optim"], r["optim"]
        assert set(got_opt) == set(want_opt)
        tables = [k for k in want_opt if any(t in k for t in PLANS[2])]
        assert len(tables) >= 3, sorted(want_opt)  # the fused adagrad state of every table is part of it
        for key, want in want_opt.items():
            assert torch.equal(got_opt[key], want), key
        assert any(float(v.abs().sum()) > 0 for k, v in want_opt.items() if k in tables)
