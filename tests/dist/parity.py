"""Sharded vs unsharded parity after one optimizer step, for any train module (run it in every rank).

A :class:`ParityCase` names how to build a train module (``forward(batch) -> (loss, TrainOutput)``)
and how to make each rank's share of one fixed global batch. :func:`check_sharding_parity`:

1. builds the module on CPU (seeded; rank 0's weights broadcast), runs the whole global batch through it and
   takes one plain SGD step (``sparse_lr`` on the embedding tables, ``dense_lr`` elsewhere): the reference;
2. builds it again on the meta device, fuses SGD(``sparse_lr``) into the tables' backward, plans with every
   table forced to ``sharding_type`` (``launch.sharding.plan``), shards it (``shard_model``), copies the
   reference's initial weights into the shards, and takes one step on this rank's share (dense SGD through
   ``in_backward_optimizer_filter`` + ``KeyedOptimizerWrapper``, as the trainer does);
3. asserts: the plan really uses ``sharding_type`` and spreads over all ranks; this rank's logits equal the
   reference's rows; the mean of the ranks' losses equals the reference loss; every weight after the step,
   gathered from the shards, equals the reference's (``atol``); and the step moved the embedding tables.

The ranks' shares must be equal-sized, in rank order (rank r holds rows ``[r * b, (r + 1) * b)``), and the
loss a mean over the batch: then DDP's gradient average and torchrec's gradient division by the world size
in the embedding all-to-all both reproduce the global batch's gradient.

To add a zoo entry: ``ParityCase(partial(build_entry_train_module, cfg, schema), partial(make_batch, ...))``
with module-level functions (the case is pickled into spawned processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from datasets.batch import Batch
from launch.sharding import (
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    embedding_tables,
    plan,
    shard_model,
)


@dataclass(frozen=True)
class ParityCase:
    """What :func:`check_sharding_parity` runs.

    Attributes:
        build_train_module: ``device -> train module``; called on ``cpu`` (reference) and ``meta`` (sharded).
        make_batch: ``(rank, world_size) -> Batch``, that rank's rows of one fixed global batch;
            ``(0, 1)`` must give the whole batch.
        seed: torch seed before building the reference.
    """

    build_train_module: Callable[[torch.device], nn.Module]
    make_batch: Callable[[int, int], Batch]
    seed: int = 0


def _slices(offsets: list[int], sizes: list[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


@torch.no_grad()
def load_full_state(dmp: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Copies unsharded tensors into the DMP's (sharded or replicated) state, in place."""
    state = dmp.state_dict()
    if set(state) != set(full):
        raise AssertionError(
            f"state keys differ: sharded only {set(state) - set(full)}, reference only {set(full) - set(state)}"
        )
    for key, t in state.items():
        if isinstance(t, ShardedTensor):
            for shard in t.local_shards():
                shard.tensor.copy_(full[key][_slices(shard.metadata.shard_offsets, shard.metadata.shard_sizes)])
        else:
            t.copy_(full[key])


@torch.no_grad()
def gather_full_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Every tensor of the DMP's state, unsharded, on every rank (shards are disjoint: a sum assembles them)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in dmp.state_dict().items():
        if isinstance(t, ShardedTensor):
            full = torch.zeros(t.size(), dtype=t.dtype)
            for shard in t.local_shards():
                full[_slices(shard.metadata.shard_offsets, shard.metadata.shard_sizes)] = shard.tensor.cpu()
            dist.all_reduce(full)
            out[key] = full
        else:
            out[key] = t.detach().cpu().clone()
    return out


def forced_config(model: nn.Module, sharding_type: str | dict[str, str], world_size: int) -> ShardingConfig:
    """Every table ``sharding_type``; column-wise shards are ``dim / world_size`` wide (one per rank).

    A dict gives each table its own type (table name -> type; tables it does not name: table-wise).
    """
    if isinstance(sharding_type, dict):
        names = embedding_tables(model)
        unknown = sorted(set(sharding_type) - set(names))
        assert not unknown, f"no such tables {unknown}; the model has {sorted(names)}"
        return ShardingConfig(
            tables={n: TableShardingConfig(sharding_types=[sharding_type.get(n, "table_wise")]) for n in names}
        )
    tables = {}
    if sharding_type == "column_wise":
        tables = {
            name: TableShardingConfig(min_partition=t.dim // world_size) for name, t in embedding_tables(model).items()
        }
    return ShardingConfig(tables=tables, default_sharding_types=[sharding_type])


def check_sharding_parity(
    rank: int,
    world_size: int,
    case: ParityCase,
    sharding_type: str | dict[str, str],
    sparse_lr: float = 0.5,
    dense_lr: float = 0.1,
    atol: float = 1e-6,
) -> dict[str, Any]:
    """Runs the check described in the module docstring; returns ``{"loss", "plan"}`` for the caller."""
    device = torch.device("cpu")

    # 1. reference
    torch.manual_seed(case.seed)
    ref = case.build_train_module(device)
    with torch.no_grad():
        for t in ref.state_dict().values():
            dist.broadcast(t, src=0)
    initial = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    sparse_ids = {id(p) for p in embedding_parameters(ref)}
    ref_loss, ref_out = ref(case.make_batch(0, 1))
    ref_logits = ref_out.logits
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= (sparse_lr if id(p) in sparse_ids else dense_lr) * p.grad
    expected = {k: v.detach().clone() for k, v in ref.state_dict().items()}

    # 2. sharded
    model = case.build_train_module(torch.device("meta"))
    tables = embedding_tables(model)
    apply_optimizer_in_backward(torch.optim.SGD, embedding_parameters(model), {"lr": sparse_lr})
    sharders = build_sharders()
    topology = build_topology(world_size, world_size, device)
    sharding_plan = plan(model, forced_config(model, sharding_type, world_size), {}, topology, sharders)
    for module_plan in sharding_plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            wanted = sharding_type.get(table, "table_wise") if isinstance(sharding_type, dict) else sharding_type
            assert ps.sharding_type == wanted, f"{table}: planned {ps.sharding_type}, wanted {wanted}"
            if wanted in ("row_wise", "column_wise"):
                assert len(set(ps.ranks)) == world_size, f"{table}: {sharding_type} shards on ranks {ps.ranks} only"
    used = sorted({r for mp in sharding_plan.plan.values() for ps in mp.values() for r in ps.ranks})  # type: ignore
    assert used == list(range(world_size)), f"the plan leaves ranks idle: tables on {used}"
    assert {t for mp in sharding_plan.plan.values() for t in mp} == set(tables)  # type: ignore[attr-defined]

    dmp = shard_model(model, sharding_plan, sharders, device)
    load_full_state(dmp, initial)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    assert dense, "no dense parameters found"
    optimizer = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=dense_lr))
    batch = case.make_batch(rank, world_size)
    loss, out = dmp(batch)
    logits = out.logits
    loss.backward()
    optimizer.step()

    # 3. compare
    b = logits.size(0)
    torch.testing.assert_close(logits, ref_logits[rank * b : (rank + 1) * b], atol=atol, rtol=0)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    torch.testing.assert_close(mean_loss, ref_loss.detach(), atol=atol, rtol=0)
    after = gather_full_state(dmp)
    assert set(after) == set(expected), f"state keys differ: {set(after) ^ set(expected)}"
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    moved = [k for k in expected if "embedding" in k and (expected[k] - initial[k]).abs().max() > 10 * atol]
    assert len(moved) == len(tables), f"the step should move every table; moved: {moved}"
    return {"loss": float(mean_loss), "plan": sharding_plan}
