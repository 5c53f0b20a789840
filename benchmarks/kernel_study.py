"""CPU embedding kernels and sparse optimizers against table size, id skew and batch (claim: a sequence lookup
trained through an EmbeddingBagCollection of one-id bags moves rows several times faster than through an
EmbeddingCollection, with the same updates).

What is measured: like ``benchmarks/embedding_lookup.py`` (whose helpers this imports: the two behaviour
tables ``t_hist_item_id`` ``--rows`` x ``--dim`` and ``t_hist_category`` ``rows / 10`` x ``dim``, Zipf ids
over a fixed permutation, ``ids`` per rank split over the two features), one gloo process per rank (one
compute thread) times, per step and behind a barrier each: a ``--copy-mb`` memcpy, ``index_select`` of the
ids from local copies of the tables (the bare gather), the forward and the backward (+ update) of each
*variant*, and ``index_add_`` of an all-ones gradient into those copies (the bare scatter of the backward).
A variant is ``module/kernel/optimizer``:

* ``ec/fused/<opt>``: the zoo's path. A torchrec ``EmbeddingCollection`` (sequence lookup, one output row per
  id) planned by :mod:`launch.sharding` with the ``fused`` kernel, the optimizer fused into fbgemm's
  backward (``apply_optimizer_in_backward``). fbgemm runs its *nobag* CPU backward.
* ``bags/fused/<opt>``: the same tables as an ``EmbeddingBagCollection`` (sum pooling) fed the same ids with
  every length 1: one bag per id, so the output rows and their gradients are exactly the sequence lookup's
  (``[N, F x D]`` instead of ``F`` tensors ``[N, D]``). fbgemm runs its pooled CPU backward (a sort of the
  ids by row, then one update per row; row-wise Adagrad through fbgemm's JIT kernels).
* ``bags/dense/<opt>``: the ``dense`` kernel, which torchrec admits only data-parallel (``ec`` cannot be
  data-parallel in this project, see :class:`launch.sharders.ZooEmbeddingCollectionSharder`): the gradient is
  a dense tensor of the whole table and a torch optimizer steps it (``zero_grad`` included in bwd).
* optimizers: ``sgd`` (EXACT_SGD), ``adagrad`` (EXACT_ADAGRAD, a state per element), ``rowwise_adagrad``
  (a state per row); ``adam`` only with the dense kernel (fbgemm has no fused Adam on CPU).

Every other kernel and combination is tried once on tiny tables (1 rank) and listed with its error.
Rates (all ranks together; the median step, a step's time being the slowest rank's): ``rows bytes = ranks x
ids x dim x 4`` over the fwd time, over the bwd time, and ``fwd+bwd GB/s = 2 x rows bytes / (fwd + bwd)``
(the rows delivered forward plus the gradient rows taken back; halve it for rows bytes over the step).
``frac`` is fwd+bwd GB/s over the memcpy GB/s of the same steps; ``x ec/sgd`` divides a variant's frac by
``ec/fused/sgd``'s at the same point, so kernels measured minutes apart compare under their own load.
The bwd fit regresses each variant's bwd time on ids and distinct rows, per table size, over the 1-rank points.

Tables up to 10^6 rows sweep every variant; larger ones only ``ec`` and ``bags`` with sgd and row-wise
Adagrad (per-element Adagrad doubles the table's memory, the dense kernel allocates a table-sized gradient).
1 rank is table-wise (the dense kernel data-parallel); the 2-rank point (10^6 rows, Zipf 1.05, 64k ids per rank;
``--no-two-rank`` skips it) is row-wise and table-wise over gloo on the same 2 cores.

Run from the repository root::

    .venv/bin/python benchmarks/kernel_study.py            # full sweep (10-20 min on 2 shared cores)
    .venv/bin/python benchmarks/kernel_study.py --quick    # one small point, under a minute
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.optim import RowWiseAdagrad  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from benchmarks.embedding_lookup import Params, SequenceLookup, _slowest_steps, make_batch  # noqa: E402
from launch.sharding import (  # noqa: E402
    ShardingConfig,
    TableShardingConfig,
    build_sharders,
    build_topology,
    embedding_parameters,
    plan,
    shard_model,
)

OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01, "eps": 1e-8}),
    "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.01, "eps": 1e-8}),
    "adam": (torch.optim.Adam, {"lr": 0.001, "eps": 1e-8}),
}
BASELINE = "ec/fused/sgd"


@dataclass(frozen=True)
class Variant:
    """One way of training the tables: ``module`` (``ec`` | ``bags``), torchrec ``kernel``, ``optimizer``."""

    module: str
    kernel: str
    optimizer: str

    @property
    def name(self) -> str:
        return f"{self.module}/{self.kernel}/{self.optimizer}"

    @property
    def big_state(self) -> bool:
        """Whether memory beyond the table grows with the table (per-element state or a dense gradient)."""
        return self.kernel == "dense" or self.optimizer in ("adagrad", "adam")


SWEPT: tuple[Variant, ...] = (
    *(Variant(m, "fused", o) for m in ("ec", "bags") for o in ("sgd", "adagrad", "rowwise_adagrad")),
    *(Variant("bags", "dense", o) for o in ("sgd", "adagrad", "adam")),
)


class BagLookup(nn.Module):
    """The behaviour tables as one-id bags: ``kjt -> [N, F * D]``, row ``i`` = feature-major rows of id ``i``."""

    def __init__(self, table_rows: dict[str, int], dim: int, device: torch.device) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=dim, feature_names=[f],
                                   pooling=PoolingType.SUM)
                for f, n in table_rows.items()
            ],
            device=device,
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(one_id_bags(kjt)).values()


def one_id_bags(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same ids with every length 1 (one bag per id); every feature must hold as many ids.

    Raises:
        ValueError: features hold different numbers of ids (a KJT has one stride for all keys).
    """
    counts = kjt.length_per_key()
    if len(set(counts)) > 1:
        raise ValueError(f"one-id bags need equal ids per feature, got {dict(zip(kjt.keys(), counts))}")
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(),
                             lengths=torch.ones(kjt.values().numel(), dtype=torch.int32))


def build_variant(v: Variant, table_rows: dict[str, int], dim: int, batch: int, sharding: str
                  ) -> tuple[Callable[[KeyedJaggedTensor], list[torch.Tensor]], Callable[[list[torch.Tensor]], None]]:
    """Plans and shards the tables for ``v`` on the default group; returns ``(fwd, bwd)``.

    ``fwd(kjt)`` returns the looked-up rows (``F`` tensors ``[N_f, D]`` for ``ec``, one ``[N, F x D]`` for
    ``bags``); ``bwd(values)`` back-propagates all-ones gradients and applies the update.
    """
    cls, kwargs = OPTIMIZERS[v.optimizer]
    device = torch.device("cpu")
    model: nn.Module = (SequenceLookup if v.module == "ec" else BagLookup)(table_rows, dim, torch.device("meta"))
    if v.kernel != "dense":
        apply_optimizer_in_backward(cls, embedding_parameters(model), dict(kwargs))
    sharding = "data_parallel" if v.kernel == "dense" else sharding
    constraint = TableShardingConfig(sharding_types=[sharding], compute_kernels=[v.kernel])
    cfg = ShardingConfig(tables={f"t_{f}": constraint for f in table_rows}, batch_size=batch)
    sharders = build_sharders()
    world = dist.get_world_size()
    torch.manual_seed(0)
    sharding_plan = plan(model, cfg, {}, build_topology(world, world, device, cfg), sharders)
    dmp = shard_model(model, sharding_plan, sharders, device)
    opt = cls(list(dmp.parameters()), **kwargs) if v.kernel == "dense" else None

    def fwd(kjt: KeyedJaggedTensor) -> list[torch.Tensor]:
        out = dmp(kjt)
        return [out[f].values() for f in table_rows] if v.module == "ec" else [out]

    def bwd(values: list[torch.Tensor]) -> None:
        torch.autograd.backward(values, [torch.ones_like(t) for t in values])
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    fwd.dmp = dmp  # type: ignore[attr-defined]  # kept alive with the closures, freed with them
    return fwd, bwd


def rates(med: dict[str, float], rows_bytes: float, copy_bytes: float) -> dict[str, float]:
    """GB/s and fractions from median step times (seconds); see the module docstring for the definitions."""
    fwdbwd = 2 * rows_bytes / (med["fwd"] + med["bwd"]) / 1e9
    memcpy = copy_bytes / med["memcpy"] / 1e9
    return {
        "fwd_ms": 1e3 * med["fwd"], "bwd_ms": 1e3 * med["bwd"],
        "fwd": rows_bytes / med["fwd"] / 1e9, "bwd": rows_bytes / med["bwd"] / 1e9, "fwdbwd": fwdbwd,
        "memcpy": memcpy, "index_select": rows_bytes / med["index_select"] / 1e9,
        "index_add": rows_bytes / med["index_add"] / 1e9, "frac": fwdbwd / memcpy,
    }  # fmt: skip


def measure(fwd: Callable, bwd: Callable, kjt: KeyedJaggedTensor, ids: dict[str, torch.Tensor],
            refs: dict[str, torch.Tensor], bufs: tuple[torch.Tensor, torch.Tensor], warmup: int, repeats: int
            ) -> dict[str, float]:
    """Median step times (s) of the references and of ``fwd`` / ``bwd`` (the slowest rank's, per step)."""
    ones = {f: torch.ones(len(i), refs[f].shape[1]) for f, i in ids.items()}
    times: dict[str, list[float]] = {k: [] for k in ("memcpy", "index_select", "fwd", "bwd", "index_add")}
    for step in range(warmup + repeats):
        t = [0.0] * 9
        dist.barrier()
        t[0] = time.perf_counter()
        bufs[1].copy_(bufs[0])
        t[1] = time.perf_counter()
        dist.barrier()
        t[2] = time.perf_counter()
        gathered = [torch.index_select(refs[f], 0, i) for f, i in ids.items()]
        t[3] = time.perf_counter()
        del gathered
        dist.barrier()
        t[4] = time.perf_counter()
        values = fwd(kjt)
        t[5] = time.perf_counter()
        bwd(values)
        t[6] = time.perf_counter()
        del values
        dist.barrier()
        t[7] = time.perf_counter()
        for f, i in ids.items():
            refs[f].index_add_(0, i, ones[f])
        t[8] = time.perf_counter()
        if step >= warmup:
            for k, (a, b) in zip(times, ((0, 1), (2, 3), (4, 5), (5, 6), (7, 8))):
                times[k].append(t[b] - t[a])
    return {k: float(_slowest_steps(v).median()) for k, v in times.items()}


@dataclass(frozen=True)
class Study:
    """What one world size sweeps (see the module docstring)."""

    rows: tuple[int, ...]
    zipfs: tuple[float, ...]
    ids: tuple[int, ...]
    variants: tuple[Variant, ...]
    dim: int = 64
    seq_len: int = 64
    warmup: int = 2
    repeats: int = 7
    copy_mb: int = 256
    big_state_max_rows: int = 1_000_000
    shardings: tuple[str, ...] = ("table_wise",)


def sweep(s: Study, rank: int) -> list[dict[str, Any]]:
    """Every (rows, variant, zipf, ids) point of ``s`` on the default group; one dict per point."""
    world = dist.get_world_size()
    n = s.copy_mb * 2**20 // 4
    bufs = (torch.rand(n), torch.empty(n))
    out: list[dict[str, Any]] = []
    for rows in s.rows:
        p0 = Params(rows, s.dim, s.ids[0], s.seq_len, s.zipfs[0], s.repeats, s.warmup, s.copy_mb, "sgd", ())
        refs = {f: torch.rand(r, s.dim) for f, r in p0.table_rows().items()}
        batches = {}
        for z in s.zipfs:
            for n_ids in s.ids:
                p = Params(rows, s.dim, n_ids, s.seq_len, z, s.repeats, s.warmup, s.copy_mb, "sgd", ())
                kjt, ids = make_batch(p, rank)
                distinct = float(sum(torch.unique(i).numel() for i in ids.values()))
                batches[(z, n_ids)] = (p, kjt, ids, distinct)
        for v in s.variants:
            if v.big_state and rows > s.big_state_max_rows:
                continue
            for sharding in ("data_parallel",) if v.kernel == "dense" else s.shardings:
                fwd, bwd = build_variant(v, p0.table_rows(), s.dim, p0.batch(), sharding)
                for (z, n_ids), (p, kjt, ids, distinct) in batches.items():
                    med = measure(fwd, bwd, kjt, ids, refs, bufs, s.warmup, s.repeats)
                    rows_bytes = world * kjt.values().numel() * s.dim * 4
                    out.append({"variant": v.name, "ranks": world, "sharding": sharding, "rows": rows, "zipf": z,
                                "ids": int(kjt.values().numel()), "distinct": distinct,
                                **rates(med, rows_bytes, world * n * 4)})
                    if rank == 0:
                        print(f"[kernel_study] {world}r {sharding} {v.name} rows {rows} zipf {z} ids {n_ids}: fwd "
                              f"{out[-1]['fwd_ms']:.1f} ms bwd {out[-1]['bwd_ms']:.1f} ms frac {out[-1]['frac']:.3f}",
                              file=sys.stderr, flush=True)
                del fwd, bwd
                gc.collect()
        del refs, batches
        gc.collect()
    return out


def probe_failures(dim: int = 8) -> list[dict[str, str]]:
    """Every other (module, kernel, optimizer) on tiny tables at 1 rank: the ones that fail, with the error."""
    from benchmarks.kernel_probe import probe  # noqa: PLC0415  (kernel_probe imports this module)

    return probe(dim)


def _worker(rank: int, world: int, s: Study, tmp: str, probe: bool) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("torchrec", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    try:
        result = {"points": sweep(s, rank), "failures": probe_failures() if probe and world == 1 else []}
        if rank == 0:
            torch.save(result, os.path.join(tmp, "result.pt"))
    finally:
        dist.destroy_process_group()


def run(s: Study, world: int, probe: bool = False) -> dict[str, Any]:
    """The sweep in ``world`` spawned gloo processes; rank 0's points (and the failures at 1 rank)."""
    with tempfile.TemporaryDirectory(prefix="kernel_study_") as tmp:
        mp.spawn(_worker, args=(world, s, tmp, probe), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


# ---------------------------------------------------------------------------------------------------- tables


def point_key(r: dict[str, Any]) -> tuple:
    """(ranks, sharding of the fused variants, rows, zipf, ids): the dense kernel's data_parallel counts as
    the 1-rank table_wise point it is measured beside."""
    sharding = "table_wise" if r["sharding"] == "data_parallel" else r["sharding"]
    return (r["ranks"], sharding, r["rows"], r["zipf"], r["ids"])


def relative(points: Sequence[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Each point with ``vs_base`` = its frac over the baseline variant's frac at the same point (None if absent)."""
    base = {point_key(r): r["frac"] for r in points if r["variant"] == baseline}
    return [{**r, "vs_base": r["frac"] / base[point_key(r)] if point_key(r) in base else None} for r in points]


def bwd_fit(points: Sequence[dict[str, Any]], variant: str, rows: int) -> dict[str, float] | None:
    """Least squares ``bwd_ms = a * ids + b * distinct + c`` over ``variant``'s 1-rank points at ``rows``.

    Returns ``ns_per_id`` (a), ``ns_per_distinct`` (b), ``c_ms`` (what does not grow with the batch: a dense
    kernel's table-sized work) and ``r2``; None with fewer than 4 points.
    """
    rs = [r for r in points if r["variant"] == variant and r["ranks"] == 1 and r["rows"] == rows]
    if len(rs) < 4:
        return None
    x = np.array([[r["ids"], r["distinct"], 1.0] for r in rs])
    y = np.array([r["bwd_ms"] for r in rs])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    r2 = 1.0 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    return {"ns_per_id": 1e6 * coef[0], "ns_per_distinct": 1e6 * coef[1], "c_ms": float(coef[2]), "r2": r2}


def pivot(points: Sequence[dict[str, Any]], value: str, variants: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of a table with one row per point and one ``value`` column per variant."""
    keys = sorted({point_key(r) for r in points})
    cell = {(point_key(r), r["variant"]): r[value] for r in points}
    cols = ["ranks", "sharding", "rows", "zipf", "ids", *variants]
    body = [[str(k[0]), k[1], f"{k[2]:.0e}", f"{k[3]:g}", str(k[4]),
             *("-" if cell.get((k, v)) is None else f"{cell[(k, v)]:.3f}" for v in variants)] for k in keys]
    return cols, body


def format_table(cols: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns under their headers: the first ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def report(points: list[dict[str, Any]], failures: list[dict[str, str]]) -> str:
    """The printed tables: per point and variant, then frac per variant, x ec/sgd, the bwd fits, the failures."""
    pts = relative(points)
    variants = list(dict.fromkeys(r["variant"] for r in pts))
    cols = ["variant", "ranks", "sharding", "rows", "zipf", "ids", "distinct", "fwd ms", "bwd ms", "fwd GB/s",
            "bwd GB/s", "fwd+bwd GB/s", "memcpy GB/s", "idx_sel GB/s", "idx_add GB/s", "frac", "x ec/sgd"]
    body = [[r["variant"], str(r["ranks"]), r["sharding"], f"{r['rows']:.0e}", f"{r['zipf']:g}", str(r["ids"]),
             f"{r['distinct']:.0f}", f"{r['fwd_ms']:.1f}", f"{r['bwd_ms']:.1f}", f"{r['fwd']:.2f}", f"{r['bwd']:.2f}",
             f"{r['fwdbwd']:.2f}", f"{r['memcpy']:.2f}", f"{r['index_select']:.2f}", f"{r['index_add']:.2f}",
             f"{r['frac']:.3f}", "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}"] for r in pts]
    parts = [format_table(cols, body), "", "fwd+bwd / memcpy (frac):", format_table(*pivot(pts, "frac", variants)),
             "", f"frac over {BASELINE}'s frac at the same point:", format_table(*pivot(pts, "vs_base", variants))]
    best = []
    for v in variants:
        fr = sorted(r["frac"] for r in pts if r["variant"] == v)
        best.append([v, str(len(fr)), f"{fr[len(fr) // 2]:.3f}", f"{fr[-1]:.3f}", str(sum(f >= 0.25 for f in fr))])
    parts += ["", "fwd+bwd at >= 25% of memcpy?", format_table(["variant", "points", "median frac", "max frac",
                                                                 "points >= 0.25"], best)]
    fits = [(v, n, bwd_fit(pts, v, n)) for v in variants for n in sorted({r["rows"] for r in pts})]
    fit_body = [[v, f"{n:.0e}", f"{f['ns_per_id']:.0f}", f"{f['ns_per_distinct']:.0f}", f"{f['c_ms']:.1f}",
                 f"{f['r2']:.2f}"] for v, n, f in fits if f is not None]
    if fit_body:
        parts += ["", "bwd ms = a x ids + b x distinct rows + c, per table size (1-rank points):",
                  format_table(["variant", "rows", "a ns/id", "b ns/distinct", "c ms", "R^2"], fit_body)]
    if failures:
        parts += ["", "kernels / combinations that do not run on CPU (tiny tables, 1 rank):",
                  format_table(["variant", "through the planner", "plan made by hand (where the planner failed)"],
                               [[f["variant"], f["planner"], f["by_hand"]] for f in failures], left=3)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=float, default=[1e5, 1e6, 1e7], help="rows of t_hist_item_id")
    ap.add_argument("--zipf", nargs="+", type=float, default=[0.0, 1.05, 1.2], help="Zipf exponents of the ids")
    ap.add_argument("--ids", nargs="+", type=int, default=[8192, 65536], help="ids per rank per step")
    ap.add_argument("--variants", nargs="+", default=[v.name for v in SWEPT], help="module/kernel/optimizer")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per point")
    ap.add_argument("--no-two-rank", action="store_true", help="skip the 2-rank point (10^6 rows, 64k ids)")
    ap.add_argument("--json", type=Path, default=None, help="also write the points and failures here")
    ap.add_argument("--report", type=Path, default=None, help="only print the tables of a --json file")
    ap.add_argument("--quick", action="store_true", help="10^5 rows, zipf 1.05, 8k ids, 3 repeats, no 2-rank point")
    args = ap.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print(report(saved["points"], saved["failures"]))
        return saved["points"]
    by_name = {v.name: v for v in SWEPT}
    bad = [n for n in args.variants if n not in by_name]
    if bad:
        ap.error(f"--variants: unknown {bad}; valid: {list(by_name)}")
    variants = tuple(by_name[n] for n in args.variants)
    s = Study(tuple(int(r) for r in args.rows), tuple(args.zipf), tuple(args.ids), variants, repeats=args.repeats)
    if args.quick:
        s = Study((100_000,), (1.05,), (8192,), variants, warmup=1, repeats=3, copy_mb=32)
        args.no_two_rank = True
    t0 = time.perf_counter()
    res = run(s, 1, probe=True)
    points, failures = res["points"], res["failures"]
    if not args.no_two_rank:
        two = [v for v in variants if v.kernel == "fused" and v.optimizer in ("sgd", "rowwise_adagrad")]
        s2 = Study((1_000_000,), (1.05,), (65536,), tuple(two), repeats=s.repeats,
                   shardings=("row_wise", "table_wise"))
        points += run(s2, 2)["points"]
    print(f"kernel study: t_hist_item_id rows x {s.dim} (+ rows/10 x {s.dim}), seq len {s.seq_len}; {s.repeats} "
          f"timed steps after {s.warmup}; 1 thread per rank, {os.cpu_count()} cores; {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"study": asdict(s), "points": points, "failures": failures}, indent=1))
    print(report(points, failures))
    return points


if __name__ == "__main__":
    main()
