"""fp16 tables (``sharding.tables.<key>.precision: fp16``) trained in 2 gloo ranks: DMP allocates the shards in
fp16, fbgemm's fused kernels update their rows, and the losses follow the fp32 run's from the same start."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from launch.sharding import (
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    plan,
    shard_model,
)
from tests.dist.parity import gather_full_state, load_full_state
from tests.dist.reference_model import build_reference_train_module, make_reference_batch
from tests.dist.runner import run_workers

pytestmark = pytest.mark.dist

# One table per sharding type: row-wise t_item, column-wise t_category (EmbeddingCollection), table-wise t_user
# (EmbeddingBagCollection).
TYPES = {"t_item": "row_wise", "t_category": "column_wise", "t_user": "table_wise"}
STEPS = 4


def _train(rank: int, world_size: int, precision: str | None, initial: dict[str, torch.Tensor]) -> dict:
    device = torch.device("cpu")
    tables = {
        t: TableShardingConfig(sharding_types=[s], min_partition=4 if s == "column_wise" else None, precision=precision)
        for t, s in TYPES.items()
    }
    model = build_reference_train_module(torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, embedding_parameters(model), {"lr": 0.5})
    sharders = build_sharders()
    sharding_plan = plan(model, ShardingConfig(tables=tables), {}, build_topology(world_size, world_size, device),
                         sharders)
    dmp = shard_model(model, sharding_plan, sharders, device)
    load_full_state(dmp, initial)  # the same start for both precisions (fp32 values rounded into fp16 shards)
    state = dmp.state_dict()
    weights = {t: next(v for k, v in state.items() if k.endswith(f".{t}.weight")) for t in TYPES}
    assert all(isinstance(w, ShardedTensor) for w in weights.values())
    # The sharded tensor's dtype and that of every shard this rank holds (a table-wise table: on one rank only).
    dtypes = {t: {w.dtype, *(s.tensor.dtype for s in w.local_shards())} for t, w in weights.items()}
    before = gather_full_state(dmp)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1))
    losses = []
    for step in range(STEPS):
        loss, _ = dmp(make_reference_batch(rank, world_size, seed=step))
        loss.backward()
        dense.step()
        dense.zero_grad()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world_size)
    after = gather_full_state(dmp)
    tables_after = {t: next(v for k, v in after.items() if k.endswith(f".{t}.weight")).float() for t in TYPES}
    changed = {t: int((next(v for k, v in before.items() if k.endswith(f".{t}.weight")).float() != w).any(1).sum())
               for t, w in tables_after.items()}
    return {"dtypes": dtypes, "losses": losses, "tables": tables_after, "changed_rows": changed}


def test_fp16_tables_train_in_two_ranks_close_to_fp32():
    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in build_reference_train_module(torch.device("cpu")).state_dict().items()}
    fp32 = run_workers(_train, world_size=2, args=(None, initial))
    fp16 = run_workers(_train, world_size=2, args=("fp16", initial))
    assert fp32[0]["dtypes"] == {t: {torch.float32} for t in TYPES}
    assert fp16[0]["dtypes"] == fp16[1]["dtypes"] == {t: {torch.float16} for t in TYPES}
    # Every table's looked-up rows moved (4 batches of 8 rows touch several rows of each table), as in fp32.
    assert fp16[0]["changed_rows"] == fp32[0]["changed_rows"] and min(fp16[0]["changed_rows"].values()) >= 3
    # Same losses up to fp16 rounding of the rows (about 1e-3 relative), and the same trained rows.
    assert fp16[0]["losses"] == fp16[1]["losses"]
    assert fp16[0]["losses"] != fp32[0]["losses"]  # the rows are fp16: not bit-identical
    torch.testing.assert_close(torch.tensor(fp16[0]["losses"]), torch.tensor(fp32[0]["losses"]), atol=5e-3, rtol=0)
    for t in TYPES:
        torch.testing.assert_close(fp16[0]["tables"][t], fp32[0]["tables"][t], atol=5e-3, rtol=0)
