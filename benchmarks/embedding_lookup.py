"""Lookup rate of sharded sequence embedding tables vs this machine's memory bandwidth (claim: the sharded
lookup runs at a useful fraction of a plain gather / memcpy).

What is measured: ``--ranks`` gloo processes (``torch.multiprocessing`` spawn, one compute thread each) build
a torchrec ``EmbeddingCollection`` like the behaviour tables of the zoo (sequence lookups, no pooling) with
two tables, ``t_hist_item_id`` (``--rows`` x ``--dim``) and ``t_hist_category`` (``--rows / 10`` x
``--dim``), plan it with the project's sharding layer (:mod:`launch.sharding`: ``build_sharders``,
``build_topology``, ``plan`` with every table forced to one sharding type, fused kernel; column-wise shards
are ``dim / ranks`` wide), and wrap it in DistributedModelParallel with a fused optimizer
(``apply_optimizer_in_backward``, ``--optimizer``). Every rank feeds its own KJT of ``--ids`` ids (half per
feature, sequences of ``--seq-len``), Zipf-distributed (exponent ``--zipf``) over a fixed random permutation
of each table's rows (hot rows are spread over row-wise shards, as with hashed ids). Each step times, on
every rank at once and behind a barrier each:

* memcpy: ``dst.copy_(src)`` of a ``--copy-mb`` MB buffer (bytes copied; each byte read once, written once).
* index_select: ``torch.index_select`` of this rank's ids from an unsharded local copy of each table (a bare
  gather: no communication, no autograd, no KJT handling).
* fwd: ``dmp(kjt)`` until every feature's values exist: input all-to-all of the ids, the shards' lookups,
  output all-to-all of the embeddings.
* bwd: ``torch.autograd.backward`` of those values with a fixed all-ones gradient: the gradient all-to-all
  and the fused optimizer's sparse update of the looked-up rows.

Interleaving the references with the lookups keeps each row's ratios comparing rates taken under the same
load (this machine is shared and noisy). After ``--warmup`` steps, ``--repeats`` steps are timed; every rate
uses the median step, a step's time being the slowest rank's. Rates are aggregate over ranks:
``GB/s = ranks x ids x dim x 4 bytes / time`` (rows delivered, fp32) for fwd and index_select, the same bytes
over the backward time for bwd (with adagrad the update also reads and writes the optimizer state, which
this does not count), ``ranks x buffer bytes / time`` for memcpy.

How to read the table: every ratio divides two rates measured in the same steps of this run.
``fwd/memcpy`` says how close the sharded lookup comes to streaming memory; a gather of ``dim x 4``-byte
rows at random addresses stays below memcpy even without communication (``index_sel GB/s`` over
``memcpy GB/s`` shows how far), so ``fwd/index_sel`` is the cost of torchrec's sharded path (KJT permutes,
all-to-alls, bucketisation, output re-assembly) over a bare gather. With 1 rank every sharding type places
the whole table on rank 0; the rows differ only in the code path. This machine has 2 CPU cores: at 2 ranks
the all-to-alls go through gloo over loopback TCP and compete with the lookups for the same two cores.

Run from the repository root::

    .venv/bin/python benchmarks/embedding_lookup.py             # 1M x 64 (+100k x 64), 64k ids per rank
    .venv/bin/python benchmarks/embedding_lookup.py --quick     # small smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchrec.modules.embedding_configs import EmbeddingConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingCollection  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor  # noqa: E402

from launch.sharding import (  # noqa: E402
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    plan,
    shard_model,
)

FEATURES = ("hist_item_id", "hist_category")
SHARDINGS = ("table_wise", "row_wise", "column_wise")
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01, "eps": 1e-8}),
}


@dataclass(frozen=True)
class Params:
    """Sizes of one benchmark run (see the module docstring)."""

    rows: int
    dim: int
    ids: int
    seq_len: int
    zipf: float
    repeats: int
    warmup: int
    copy_mb: int
    optimizer: str
    shardings: tuple[str, ...]

    def table_rows(self) -> dict[str, int]:
        return {FEATURES[0]: self.rows, FEATURES[1]: max(1, self.rows // 10)}

    def batch(self) -> int:
        """Sequences per feature per rank: ``ids`` split evenly over the two features."""
        return max(1, self.ids // (len(FEATURES) * self.seq_len))


class SequenceLookup(nn.Module):
    """The behaviour tables of a zoo entry, alone: ``kjt -> {feature: JaggedTensor of [N_f, D]}``."""

    def __init__(self, table_rows: dict[str, int], dim: int, device: torch.device) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=dim, feature_names=[f])
                for f, n in table_rows.items()
            ],
            device=device,
        )

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(kjt)


def zipf_ids(rng: np.random.Generator, rows: int, n: int, exponent: float) -> np.ndarray:
    """``n`` ids in ``[0, rows)``: Zipf ranks (``P(r) ∝ r ** -exponent``) mapped through a fixed permutation."""
    p = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), rows - 1)
    perm = np.random.default_rng(12345 + rows).permutation(rows)  # the same on every rank
    return perm[ranks]


def make_batch(p: Params, rank: int) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """This rank's KJT (``B`` sequences of ``seq_len`` per feature) and its ids per feature."""
    rng = np.random.default_rng(1000 + rank)
    b = p.batch()
    ids = {f: torch.from_numpy(zipf_ids(rng, n, b * p.seq_len, p.zipf)) for f, n in p.table_rows().items()}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES),
        values=torch.cat([ids[f] for f in FEATURES]),
        lengths=torch.full((len(FEATURES) * b,), p.seq_len, dtype=torch.int32),
    )
    return kjt, ids


def _slowest_steps(seconds: list[float]) -> torch.Tensor:
    """Per-step times of the slowest rank (elementwise max over ranks), ``[repeats]``."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def measure(p: Params, sharding_type: str, kjt: KeyedJaggedTensor, ids: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rates (GB/s, all ranks together) of the tables sharded ``sharding_type`` and of the references.

    Each step times, in order and behind a barrier each: the memcpy, the index_select gather, the DMP forward
    and its backward. Interleaving makes every row's ratios compare rates taken under the same load; each rate
    uses the median step (slowest rank per step).
    """
    world, device = dist.get_world_size(), torch.device("cpu")
    model = SequenceLookup(p.table_rows(), p.dim, torch.device("meta"))
    opt_cls, opt_kwargs = OPTIMIZERS[p.optimizer]
    apply_optimizer_in_backward(opt_cls, embedding_parameters(model), dict(opt_kwargs))  # torchrec edits it
    width = p.dim // world if sharding_type == "column_wise" else None
    cfg = ShardingConfig(
        tables={f"t_{f}": TableShardingConfig([sharding_type], ["fused"], width) for f in FEATURES},
        batch_size=p.batch(),
    )
    sharders = build_sharders()
    sharding_plan = plan(model, cfg, {}, build_topology(world, world, device, cfg), sharders)
    placement = " ".join(
        f"{table}:{','.join(str(r) for r in ps.ranks)}"
        for module_plan in sharding_plan.plan.values()
        for table, ps in module_plan.items()  # type: ignore[attr-defined]
    )
    torch.manual_seed(0)
    dmp = shard_model(model, sharding_plan, sharders, device)

    n = p.copy_mb * 2**20 // 4
    src, dst = torch.rand(n), torch.empty(n)
    tables = {f: torch.rand(rows, p.dim) for f, rows in p.table_rows().items()}  # unsharded local copies
    n_ids = int(kjt.values().numel())
    grads: list[torch.Tensor] | None = None
    times: dict[str, list[float]] = {"memcpy": [], "index_select": [], "fwd": [], "bwd": []}
    for step in range(p.warmup + p.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        gathered = [torch.index_select(tables[f], 0, ids[f]) for f in FEATURES]
        t3 = time.perf_counter()
        del gathered
        dist.barrier()
        t4 = time.perf_counter()
        out = dmp(kjt)
        values = [out[f].values() for f in FEATURES]  # waits for the output all-to-all
        t5 = time.perf_counter()
        if grads is None:
            grads = [torch.ones_like(v) for v in values]
            assert sum(int(v.shape[0]) for v in values) == n_ids and values[0].shape[1] == p.dim
        torch.autograd.backward(values, grads)  # gradient all-to-all + fused optimizer update
        t6 = time.perf_counter()
        del out, values
        if step >= p.warmup:
            for key, dt in (("memcpy", t1 - t0), ("index_select", t3 - t2), ("fwd", t5 - t4), ("bwd", t6 - t5)):
                times[key].append(dt)
    med = {k: float(_slowest_steps(v).median()) for k, v in times.items()}
    rows_bytes = world * n_ids * p.dim * 4
    del dmp, model, tables, src, dst
    gc.collect()
    return {
        "fwd": rows_bytes / med["fwd"] / 1e9,
        "bwd": rows_bytes / med["bwd"] / 1e9,
        "memcpy": world * n * 4 / med["memcpy"] / 1e9,
        "index_select": rows_bytes / med["index_select"] / 1e9,
        "fwd_ms": 1e3 * med["fwd"],
        "bwd_ms": 1e3 * med["bwd"],
        "placement": placement,
    }


def _worker(rank: int, world: int, p: Params, tmp: str) -> None:
    torch.set_num_threads(1)  # one core per rank
    warnings.simplefilter("ignore")  # the planner's and fx's notices would bury the table
    for name in ("torchrec", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        kjt, ids = make_batch(p, rank)
        result: dict[str, Any] = {"runs": {}}
        uniq = torch.tensor([float(torch.unique(v).numel()) / v.numel() for v in ids.values()])
        dist.all_reduce(uniq)
        result["unique"] = (uniq / world).tolist()
        for sharding_type in p.shardings:
            result["runs"][sharding_type] = measure(p, sharding_type, kjt, ids)
        if rank == 0:
            torch.save(result, os.path.join(tmp, "result.pt"))
    finally:
        dist.destroy_process_group()


def run(p: Params, world: int) -> dict[str, Any]:
    """Runs the benchmark in ``world`` spawned gloo processes; returns rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="bench_emb_") as tmp:
        mp.spawn(_worker, args=(world, p, tmp), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of t_hist_item_id (t_hist_category: rows/10)")
    ap.add_argument("--dim", type=int, default=64, help="embedding dim (even, so column-wise halves it)")
    ap.add_argument("--ids", type=int, default=65_536, help="ids per rank per step, split over the two features")
    ap.add_argument("--seq-len", type=int, default=64, help="ids per sequence")
    ap.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--copy-mb", type=int, default=256, help="memcpy reference buffer (MB)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd", help="fused sparse optimizer")
    ap.add_argument("--shardings", nargs="+", choices=SHARDINGS, default=list(SHARDINGS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="world sizes (default 1 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100k rows, 8k ids, 3 repeats, 32 MB copy")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.ids, args.repeats, args.warmup, args.copy_mb = 100_000, 8192, 3, 1, 32
    if any(args.dim % w for w in args.ranks if "column_wise" in args.shardings):
        ap.error(f"--dim {args.dim} must be divisible by every --ranks value for column_wise")
    p = Params(args.rows, args.dim, args.ids, args.seq_len, args.zipf, args.repeats, args.warmup, args.copy_mb,
               args.optimizer, tuple(args.shardings))

    rows: list[dict[str, Any]] = []
    for world in args.ranks:
        res = run(p, world)
        print(f"[bench] {world} rank(s): unique id fraction per feature {res['unique']}", file=sys.stderr)
        for sharding_type, r in res["runs"].items():
            rows.append({"sharding": sharding_type, "ranks": world, **r})

    n_ids = len(FEATURES) * p.batch() * p.seq_len
    sizes = ", ".join(f"t_{f} {n} x {p.dim}" for f, n in p.table_rows().items())
    print(f"embedding lookup: {sizes}; {n_ids} ids per rank (zipf {p.zipf}, seq len {p.seq_len}); "
          f"{p.repeats} timed steps after {p.warmup}; fused {p.optimizer}; 1 thread per rank, {os.cpu_count()} cores")
    cols = ["sharding", "ranks", "fwd ms", "bwd ms", "fwd GB/s", "bwd GB/s", "memcpy GB/s", "index_sel GB/s",
            "fwd/memcpy", "bwd/memcpy", "fwd/index_sel", "placement (table:ranks)"]
    table = [
        [r["sharding"], str(r["ranks"]), f"{r['fwd_ms']:.1f}", f"{r['bwd_ms']:.1f}", f"{r['fwd']:.2f}",
         f"{r['bwd']:.2f}", f"{r['memcpy']:.2f}", f"{r['index_select']:.2f}", f"{r['fwd'] / r['memcpy']:.3f}",
         f"{r['bwd'] / r['memcpy']:.3f}", f"{r['fwd'] / r['index_select']:.3f}", r["placement"]]
        for r in rows
    ]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, len(cols) - 1) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(fmt(cols))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print(fmt(t))
    return rows


if __name__ == "__main__":
    main()
