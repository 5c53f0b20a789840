"""Where the time of one fused forward + backward step goes (torch.profiler, CPU), at embedding_lookup.py's
default size: 10^6 x 64 (+ 10^5 x 64) tables, 64k ids per rank, Zipf 1.05, sequences of 64, fused SGD.

For each variant of :mod:`benchmarks.kernel_study` asked for (default ``ec/fused/sgd``, the zoo's path, and
``bags/fused/sgd``, the same rows as one-id bags) and each world size (default 1 rank table-wise and 2 ranks
row-wise or ``--sharding table_wise``, gloo on this machine's 2 cores), ``--warmup`` steps run, then one step runs under
``torch.profiler`` (CPU activities) on every rank; rank 0's ops are grouped by self CPU time into

* ``tbe backward``: fbgemm's backward kernel, which sorts / groups the ids by row and applies the optimizer
  to each distinct row in one op (the profiler cannot see inside it);
* ``tbe forward``: fbgemm's forward kernel (the gather);
* ``input checks``: ``bounds_check_indices``, the bucketisation and permutes of the ids;
* ``communication``: gloo collectives (the all-to-alls of ids, embeddings and gradients, their waits);
* ``tensor glue``: cat / split / fill / copy of the outputs and gradients;
* ``autograd``: the autograd engine's own nodes;
* ``torchrec python``: the self time of torchrec's labelled ranges (``[lookup]...``, ``## ... wait() ##``):
  KJT and awaitable bookkeeping in Python;
* ``other``: the rest.

It prints, per run, the shares and the top ``--top`` ops, and writes ``<out>/<variant>_<ranks>r_<sharding>.txt``
(the profiler's table) and ``.json`` (a Chrome trace). Beside them it times, on the same ids, what a backward must
do at least: ``torch.sort`` of each feature's ids (a sort-based grouping) and ``index_add_`` of the gradient
rows into a table (the scatter), so the kernel's time can be read against them.

Run from the repository root::

    .venv/bin/python benchmarks/kernel_profile.py                       # writes runs/kernel_profile/
    .venv/bin/python benchmarks/kernel_profile.py --ranks 1 --variants ec/fused/sgd
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.embedding_lookup import Params, make_batch  # noqa: E402
from benchmarks.kernel_study import SWEPT, build_variant, format_table  # noqa: E402

# lower-case substrings of collective ops and of torchrec's autograd functions around them (All2All_Seq_Req*,
# ReduceScatterBase_Req*, ...); "gloo:" with its colon ("nobaglookup" holds "gloo")
COMMUNICATION = ("gloo:", "c10d::", "all_to_all", "alltoall", "all2all_seq", "all2all_pooled", "reducescatter",
                 "allgather", "allreduce", "all_reduce", "record_param_comms", "barrier")
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (  # (category, name prefixes), first match wins
    ("tbe backward", ("fbgemm::split_embedding_nobag_backward", "fbgemm::split_embedding_backward")),
    ("tbe forward", ("fbgemm::split_embedding_nobag_codegen_forward", "fbgemm::split_embedding_codegen_forward")),
    ("input checks", ("fbgemm::bounds_check", "fbgemm::block_bucketize", "fbgemm::permute", "fbgemm::invert_permute",
                      "fbgemm::asynchronous", "fbgemm::offsets_range")),
    ("tensor glue", ("aten::cat", "aten::split", "aten::fill_", "aten::copy_", "aten::zero_", "aten::ones_like",
                     "aten::empty", "aten::_to_copy", "aten::to", "aten::narrow", "aten::view", "aten::reshape",
                     "aten::contiguous", "aten::clone", "aten::index_select", "aten::cumsum", "aten::sum")),
    ("autograd", ("autograd::", "torch::autograd")),
    ("torchrec python", ("##", "[")),
)


def category(op: str) -> str:
    """The group of a profiler op name (see the module docstring); ``other`` when none matches."""
    if any(s in op.lower() for s in COMMUNICATION):
        return "communication"
    for name, prefixes in CATEGORIES:
        if op.startswith(prefixes):
            return name
    return "other"


def shares(self_us: dict[str, float]) -> dict[str, float]:
    """Self time per category over the total of ``{op: self µs}``; sums to 1 (empty input: {})."""
    total = sum(self_us.values())
    out: dict[str, float] = {}
    for op, us in self_us.items():
        out[category(op)] = out.get(category(op), 0.0) + us
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])} if total > 0 else {}


def _refs(ids: dict[str, torch.Tensor], dim: int, rows: dict[str, int], repeats: int = 5) -> dict[str, float]:
    """Median ms of a sort of each feature's ids and of index_add_ of their gradient rows into a table."""
    tables = {f: torch.zeros(n, dim) for f, n in rows.items()}
    ones = {f: torch.ones(len(i), dim) for f, i in ids.items()}
    t_sort, t_add = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in ids.values():
            torch.sort(i)
        t1 = time.perf_counter()
        for f, i in ids.items():
            tables[f].index_add_(0, i, ones[f])
        t2 = time.perf_counter()
        t_sort.append(t1 - t0)
        t_add.append(t2 - t1)
    return {"sort_ms": 1e3 * sorted(t_sort)[repeats // 2], "index_add_ms": 1e3 * sorted(t_add)[repeats // 2]}


def profile_step(variant: str, p: Params, rank: int, out: Path, sharding: str, top: int) -> dict[str, Any]:
    """Builds ``variant``, runs ``p.warmup`` steps, profiles one; rank 0 writes the table and trace."""
    v = {x.name: x for x in SWEPT}[variant]
    fwd, bwd = build_variant(v, p.table_rows(), p.dim, p.batch(), sharding)
    kjt, ids = make_batch(p, rank)
    for _ in range(p.warmup):
        bwd(fwd(kjt))
    dist.barrier()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bwd(fwd(kjt))
    wall = time.perf_counter() - t0
    avgs = prof.key_averages()
    self_us = {e.key: float(e.self_cpu_time_total) for e in avgs}
    world = dist.get_world_size()
    if rank == 0:
        stem = out / f"{variant.replace('/', '_')}_{world}r_{sharding}"
        (stem.with_suffix(".txt")).write_text(avgs.table(sort_by="self_cpu_time_total", row_limit=40))
        prof.export_chrome_trace(str(stem.with_suffix(".json")))
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])[:top]
    return {"variant": variant, "ranks": world, "sharding": sharding, "wall_ms": 1e3 * wall,
            "self_ms": sum(self_us.values()) / 1e3,
            "shares": shares(self_us), "top": [(k, us / 1e3, category(k)) for k, us in ranked],
            **_refs(ids, p.dim, p.table_rows())}


def _worker(rank: int, world: int, variants: Sequence[str], p: Params, out: Path, top: int, sharding: str,
            tmp: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("torchrec", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        sharding = "table_wise" if world == 1 else sharding
        res = [profile_step(v, p, rank, out, sharding, top) for v in variants]
        if rank == 0:
            torch.save(res, os.path.join(tmp, "result.pt"))
    finally:
        dist.destroy_process_group()


def summary(r: dict[str, Any]) -> str:
    """Shares and top ops of one profiled step, as printed."""
    head = (f"{r['variant']} at {r['ranks']} rank(s) {r['sharding']}: step {r['wall_ms']:.1f} ms wall under the "
            f"profiler, {r['self_ms']:.1f} ms self CPU in ops; references on the same ids: sort {r['sort_ms']:.1f} ms, "
            f"index_add_ {r['index_add_ms']:.1f} ms")
    cats = format_table(["category", "share", "ms"], [[k, f"{v:.1%}", f"{v * r['self_ms']:.2f}"]
                                                      for k, v in r["shares"].items()])
    ops = format_table(["op (top by self CPU)", "ms", "category"], [[k[:70], f"{ms:.2f}", c] for k, ms, c in r["top"]])
    return "\n".join([head, cats, "", ops])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["ec/fused/sgd", "bags/fused/sgd"],
                    choices=[v.name for v in SWEPT if v.kernel == "fused"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="world sizes (default 1 2)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ids", type=int, default=65_536)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="ops listed per run")
    ap.add_argument("--sharding", choices=["row_wise", "table_wise"], default="row_wise",
                    help="of the runs on more than 1 rank (1 rank is table-wise)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kernel_profile")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    p = Params(args.rows, 64, args.ids, 64, 1.05, 1, args.warmup, 0, "sgd", ())
    results: list[dict[str, Any]] = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory(prefix="kernel_profile_") as tmp:
            mp.spawn(_worker, args=(world, args.variants, p, args.out, args.top, args.sharding, tmp), nprocs=world,
                     join=True)
            results += torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
    print(f"profile of one step: t_hist_item_id {p.rows} x {p.dim} (+ {p.rows // 10} x {p.dim}), {p.ids} ids per rank"
          f" (zipf {p.zipf}), after {p.warmup} warm-up steps; rank 0's ops; files in {args.out}")
    for r in results:
        print()
        print(summary(r))
    return results


if __name__ == "__main__":
    main()
