"""Per-table sparse optimizer settings (``optim.tables``) reach the fused optimizer of a sharded model whose two
sub-models hold a table each per feature (``cotrain_tiny``: ``t_item_id__a`` / ``t_item_id__b``).

One gloo process (a world of one, spawned by tests.dist.runner): build on meta, ``apply_sparse_optimizers``,
plan, shard, one step; then the fused optimizer's state and param groups, and the step itself, show each table's
optimizer and learning rate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from tests.dist.runner import run_workers

ROOT = Path(__file__).resolve().parents[2]
ROWWISE_LR, DEFAULT_LR = 0.2, 0.05


def _local(t: Any) -> torch.Tensor:
    """The local tensor of a (single-shard, world of one) ShardedTensor, or the tensor itself."""
    if isinstance(t, ShardedTensor):
        (shard,) = t.local_shards()
        return shard.tensor.detach().clone()
    return t.detach().clone()


def _one_step(rank: int, world_size: int) -> dict[str, Any]:
    from launch import sharding
    from launch.config import load_config
    from launch.optim import OptimConfig, SparseGroupConfig, SparseOptimizer, apply_sparse_optimizers, build_optimizer
    from tests.models.batch_helpers import make_batch

    cfg, spec, _ = load_config(ROOT / "configs/tests/cotrain_tiny.yaml")
    optim = OptimConfig(
        sparse=SparseOptimizer.adagrad, sparse_lr=DEFAULT_LR,
        tables={"t_item_id__b": SparseGroupConfig(optimizer=SparseOptimizer.rowwise_adagrad, lr=ROWWISE_LR)},
    )
    torch.manual_seed(0)
    train_module = spec.build_train_module(spec.build(cfg.model, cfg.data.schema, torch.device("meta")), cfg.model)
    settings = apply_sparse_optimizers(train_module, optim)
    sharders = sharding.build_sharders()
    topology = sharding.build_topology(world_size, world_size, torch.device("cpu"))
    plan = sharding.plan(train_module, sharding.ShardingConfig(), {}, topology, sharders)
    dmp = sharding.shard_model(train_module, plan, sharders, torch.device("cpu"))
    optimizer, _ = build_optimizer(dmp, optim)

    g = torch.Generator().manual_seed(1)
    b = 16
    hist = [torch.randint(1, 1001, (int(n),), generator=g).tolist() for n in torch.randint(1, 8, (b,), generator=g)]
    batch = make_batch(
        cfg.data.schema,
        scalars={
            "user_id": torch.randint(1, 201, (b,), generator=g).tolist(),
            "item_id": torch.randint(1, 1001, (b,), generator=g).tolist(),
            "item_category": torch.randint(1, 51, (b,), generator=g).tolist(),
        },
        sequences={"hist_item_id": hist, "hist_category": [[i % 50 + 1 for i in h] for h in hist]},
        labels=(torch.rand(b, 1, generator=g) < 0.5).float(),
    )
    before = {k: _local(v) for k, v in dmp.state_dict().items() if ".embeddings." in k}
    loss, _ = dmp(batch)
    loss.backward()  # the fused optimizers update the tables here
    optimizer.step()
    after = {k: _local(v) for k, v in dmp.state_dict().items() if ".embeddings." in k}

    fused = dmp.fused_optimizer
    names = {id(p): k for k, p in fused.params.items()}
    lrs = {names[id(p)]: float(group["lr"]) for group in fused.param_groups for p in group["params"]}
    state = {k: {s: _local(v) for s, v in d.items()} for k, d in fused.state_dict()["state"].items()}
    return {
        "settings": {t: (s.optimizer.value, s.lr) for t, s in settings.items()},
        "lrs": lrs,
        "state": state,
        "delta": {k: after[k] - before[k] for k in before},
    }


def _assert_step_size(sizes: torch.Tensor, expected: float, table: str) -> None:
    """First Adagrad steps are ``lr * |g| / (|g| + eps)``: ``expected`` up to eps (a little less for tiny |g|)."""
    assert float(sizes.max()) <= expected * (1 + 1e-4), (table, float(sizes.max()), expected)
    assert math.isclose(float(sizes.median()), expected, rel_tol=1e-3), (table, float(sizes.median()), expected)


def test_per_table_optimizer_settings_reach_the_fused_optimizer() -> None:
    (r,) = run_workers(_one_step, world_size=1, timeout_s=300)
    tables = ["t_user_id", "t_item_id", "t_item_category"]
    keys = {f"{t}__{role}": f"model.{role}.ec.embeddings.{t}__{role}.weight" for t in tables for role in "ab"}
    assert set(r["lrs"]) == set(keys.values()) == set(r["state"]) == set(r["delta"])
    assert r["settings"]["t_item_id__b"] == ("rowwise_adagrad", ROWWISE_LR)
    dim = 8
    for table, key in keys.items():
        rowwise = table == "t_item_id__b"
        lr = ROWWISE_LR if rowwise else DEFAULT_LR
        assert r["settings"][table] == ("rowwise_adagrad" if rowwise else "adagrad", lr)
        assert math.isclose(r["lrs"][key], lr, rel_tol=1e-6), (table, r["lrs"][key])
        (momentum,) = r["state"][key].values()  # "<table>.momentum1"
        delta = r["delta"][key]
        rows = delta.size(0)
        touched = delta.abs().sum(dim=1) > 0  # [rows]
        assert 0 < int(touched.sum()) < rows, table
        if rowwise:
            # Row-wise Adagrad: one accumulator per row; the first step moves a row by lr * sqrt(D) (norm).
            assert momentum.shape == (rows,), (table, momentum.shape)
            assert torch.equal(momentum > 0, touched)
            _assert_step_size(delta[touched].norm(dim=1), lr * math.sqrt(dim), table)
        else:
            # Adagrad: one accumulator per element; the first step moves every element with a gradient by lr.
            assert momentum.shape == (rows, dim), (table, momentum.shape)
            assert torch.equal((momentum > 0).any(dim=1), touched)
            _assert_step_size(delta[delta != 0].abs(), lr, table)
