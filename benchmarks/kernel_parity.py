"""Parity of the sequence lookup's two fused paths (claim: ``ec/fused/<opt>`` and ``bags/fused/<opt>`` of
:mod:`benchmarks.kernel_study` train to the same result).

What is run: a small model, the two behaviour tables (``--rows`` x ``--dim`` and ``rows / 10``) looked up as
sequences of ``L`` ids for ``B`` samples, the mean over each sequence, concatenated over the two features
``[B, 2D]``, a linear head ``[B]`` and a logistic loss on a planted label (1 when the first item of the
sequence is in a fixed random half of the rows). The same weights (tables and head, written into the sharded
tables after sharding) and the same batches train once through an ``EmbeddingCollection`` (``ec``) and once
through an ``EmbeddingBagCollection`` of one-id bags (``bags``), the tables' optimizer fused into the
backward, the head trained by torch SGD. Reported per optimizer: the largest difference of the per-step losses,
the loss at the start and the end, the largest difference of the tables' weights after the last step and how
many rows training changed.

Run from the repository root::

    .venv/bin/python benchmarks/kernel_parity.py                  # 300 steps, sgd / adagrad / rowwise_adagrad
    .venv/bin/python benchmarks/kernel_parity.py --steps 50 --ranks 2   # row-wise over 2 gloo ranks
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402
from torchrec.optim.optimizers import in_backward_optimizer_filter  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from benchmarks.embedding_lookup import FEATURES, SequenceLookup, zipf_ids  # noqa: E402
from benchmarks.kernel_study import OPTIMIZERS, BagLookup  # noqa: E402
from launch.sharding import (  # noqa: E402
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    plan,
    shard_model,
)


class ParityModel(nn.Module):
    """Tables -> mean over each sequence -> linear head: ``kjt -> logits [B]``.

    Args:
        module: ``ec`` (EmbeddingCollection) or ``bags`` (EmbeddingBagCollection of one-id bags).
        table_rows: rows per feature.
        dim: D.
        seq_len: L, the ids of every sequence (each feature holds ``B x L`` ids).
    """

    def __init__(self, module: str, table_rows: dict[str, int], dim: int, seq_len: int) -> None:
        super().__init__()
        self.module, self.seq_len = module, seq_len
        self.lookup = (SequenceLookup if module == "ec" else BagLookup)(table_rows, dim, torch.device("meta"))
        self.head = nn.Linear(len(table_rows) * dim, 1, device=torch.device("meta"))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if self.module == "ec":
            out = self.lookup(kjt)
            rows = torch.cat([out[f].values() for f in FEATURES], dim=1)  # [B * L, 2D]
        else:
            rows = self.lookup(kjt)  # [B * L, 2D], feature-major columns as the concatenation above
        pooled = rows.view(-1, self.seq_len, rows.shape[1]).mean(dim=1)  # [B, 2D]
        return self.head(pooled).squeeze(1)  # [B]


def batches(table_rows: dict[str, int], b: int, seq_len: int, steps: int, seed: int
            ) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """``steps`` batches of ``b`` sequences (Zipf 1.05 ids) and their planted labels ``[B]``."""
    rng = np.random.default_rng(seed)
    positive = np.random.default_rng(seed + 1).random(table_rows[FEATURES[0]]) < 0.5
    out = []
    for _ in range(steps):
        ids = {f: zipf_ids(rng, n, b * seq_len, 1.05) for f, n in table_rows.items()}
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(FEATURES), values=torch.from_numpy(np.concatenate([ids[f] for f in FEATURES])),
            lengths=torch.full((len(FEATURES) * b,), seq_len, dtype=torch.int32))
        labels = torch.from_numpy(positive[ids[FEATURES[0]].reshape(b, seq_len)[:, 0]].astype(np.float32))
        out.append((kjt, labels))
    return out


def initial_weights(table_rows: dict[str, int], dim: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The tables ``{t_<feature>: [rows, D]}`` and the head's weight ``[1, F x D]`` both runs start from."""
    g = torch.Generator().manual_seed(seed)
    tables = {f"t_{f}": torch.rand(n, dim, generator=g) * 0.2 - 0.1 for f, n in table_rows.items()}
    return tables, torch.rand(1, len(table_rows) * dim, generator=g) * 0.2 - 0.1


def train(module: str, optimizer: str, table_rows: dict[str, int], dim: int, b: int, seq_len: int, steps: int,
          sharding: str = "table_wise", seed: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Trains :class:`ParityModel` on the default group; returns the per-step losses (all ranks' mean) and
    rank 0's view of the final tables (all shards gathered: ``{table: [rows, D]}``)."""
    cls, kwargs = OPTIMIZERS[optimizer]
    model = ParityModel(module, table_rows, dim, seq_len)
    apply_optimizer_in_backward(cls, embedding_parameters(model), dict(kwargs))
    constraint = TableShardingConfig(sharding_types=[sharding], compute_kernels=["fused"])
    cfg = ShardingConfig(tables={f"t_{f}": constraint for f in table_rows}, batch_size=b)
    world, device = dist.get_world_size(), torch.device("cpu")
    sharders = build_sharders()
    sharding_plan = plan(model, cfg, {}, build_topology(world, world, device, cfg), sharders)
    dmp = shard_model(model, sharding_plan, sharders, device)
    init, head_w = initial_weights(table_rows, dim, seed)
    head_b = torch.zeros(1)
    with torch.no_grad():
        for name, shard in dmp.state_dict().items():
            table = name.split(".")[-2]
            if table in init and hasattr(shard, "local_shards"):
                for s in shard.local_shards():
                    r0, c0 = s.metadata.shard_offsets
                    r1, c1 = r0 + s.metadata.shard_sizes[0], c0 + s.metadata.shard_sizes[1]
                    s.tensor.copy_(init[table][r0:r1, c0:c1])
        dmp.module.head.weight.copy_(head_w)  # type: ignore[union-attr]
        dmp.module.head.bias.copy_(head_b)  # type: ignore[union-attr]
    dense = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=0.1)
    rank = dist.get_rank()
    losses = []
    for kjt, labels in batches(table_rows, b, seq_len, steps, seed=100 + rank):
        loss = nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels)
        loss.backward()
        dense.step()
        dense.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    final = {}
    for name, shard in dmp.state_dict().items():
        table = name.split(".")[-2]
        if table in init and hasattr(shard, "local_shards"):
            full = torch.zeros(init[table].shape) if rank == 0 else None
            shard.gather(dst=0, out=full)
            if rank == 0:
                final[table] = full
    return losses, final


def compare(rank: int, world: int, optimizers: Sequence[str], steps: int, rows: int, dim: int, b: int,
            seq_len: int, sharding: str) -> list[dict[str, Any]]:
    """``ec`` vs ``bags`` per optimizer on the default group (``run_workers`` / spawn entry point)."""
    table_rows = {FEATURES[0]: rows, FEATURES[1]: max(1, rows // 10)}
    out = []
    for opt in optimizers:
        l_ec, w_ec = train("ec", opt, table_rows, dim, b, seq_len, steps, sharding)
        l_bags, w_bags = train("bags", opt, table_rows, dim, b, seq_len, steps, sharding)
        diff = max(abs(a - c) for a, c in zip(l_ec, l_bags))
        w_diff = max(float((w_ec[t] - w_bags[t]).abs().max()) for t in w_ec) if rank == 0 else float("nan")
        init, _ = initial_weights(table_rows, dim, 0)
        updated = sum(int((w_ec[t] != init[t]).any(dim=1).sum()) for t in w_ec) if rank == 0 else -1
        out.append({"optimizer": opt, "ranks": world, "steps": steps, "loss_diff": diff, "weight_diff": w_diff,
                    "rows_updated": updated,
                    "loss_first": l_ec[0], "loss_last": sum(l_ec[-10:]) / len(l_ec[-10:]),
                    "loss_last_bags": sum(l_bags[-10:]) / len(l_bags[-10:])})
    return out


def _worker(rank: int, world: int, args: tuple, tmp: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("torchrec", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        res = compare(rank, world, *args)
        if rank == 0:
            torch.save(res, os.path.join(tmp, "result.pt"))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adagrad", "rowwise_adagrad"],
                    choices=["sgd", "adagrad", "rowwise_adagrad"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=2000, help="rows of t_hist_item_id (t_hist_category: rows/10)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=1, help="1: table-wise; more: row-wise")
    args = ap.parse_args(argv)
    sharding = "table_wise" if args.ranks == 1 else "row_wise"
    cargs = (tuple(args.optimizers), args.steps, args.rows, args.dim, args.batch, args.seq_len, sharding)
    with tempfile.TemporaryDirectory(prefix="kernel_parity_") as tmp:
        mp.spawn(_worker, args=(args.ranks, cargs, tmp), nprocs=args.ranks, join=True)
        res = torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
    print(f"ec vs bags: {args.steps} steps, {args.batch} x {args.seq_len} ids per feature per rank, tables "
          f"{args.rows} / {max(1, args.rows // 10)} x {args.dim}, {args.ranks} rank(s) {sharding}")
    print(f"{'optimizer':<16} {'max |loss diff|':>16} {'max |weight diff|':>18} {'loss first':>11} "
          f"{'loss last 10 (ec)':>18} {'(bags)':>8} {'rows updated':>13}")
    for r in res:
        print(f"{r['optimizer']:<16} {r['loss_diff']:>16.2e} {r['weight_diff']:>18.2e} {r['loss_first']:>11.4f} "
              f"{r['loss_last']:>18.4f} {r['loss_last_bags']:>8.4f} {r['rows_updated']:>13}")
    return res


if __name__ == "__main__":
    main()
