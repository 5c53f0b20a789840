"""Which torchrec compute kernels and fused optimizers run a sequence lookup on CPU, and how the rest fail.

:func:`probe` tries, on tiny tables (1 rank; the default process group must be initialised), every
``EmbeddingComputeKernel`` for ``ec`` (EmbeddingCollection) and ``bags`` (EmbeddingBagCollection of one-id
bags, :class:`benchmarks.kernel_study.BagLookup`) through the project's planner, with a sharder that offers
every kernel (torchrec's CPU sharders offer only ``fused``, and ``dense`` data-parallel), plus fused Adam and
``ec``'s dense kernel placed table-wise by hand (the planner refuses it). A probe that gets through one
forward and backward with the rows of the right shape counts as running; its fbgemm ops are compared with
the ``fused`` kernel's. Used by
``benchmarks/kernel_study.py``; run alone it prints the list::

    .venv/bin/python benchmarks/kernel_probe.py
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchrec.distributed.embedding_types import EmbeddingComputeKernel  # noqa: E402
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise  # noqa: E402
from torchrec.distributed.types import ShardingPlan  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from benchmarks.embedding_lookup import FEATURES, SequenceLookup  # noqa: E402
from benchmarks.kernel_study import OPTIMIZERS, BagLookup  # noqa: E402
from launch.sharders import CpuEmbeddingBagCollectionSharder, ZooEmbeddingCollectionSharder  # noqa: E402
from launch.sharding import (  # noqa: E402
    ShardingConfig,
    TableShardingConfig,
    build_topology,
    embedding_parameters,
    plan,
    shard_model,
)

ALL_KERNELS: tuple[str, ...] = tuple(k.value for k in EmbeddingComputeKernel)


class _EveryKernel:
    """Sharder mixin offering every compute kernel, so that the planner (not the sharder) decides."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return list(ALL_KERNELS)


class _EcEvery(_EveryKernel, ZooEmbeddingCollectionSharder):
    pass


class _EbcEvery(_EveryKernel, CpuEmbeddingBagCollectionSharder):
    pass


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of an error; an empty message names the function that raised it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Compute kernel")]
    if lines:
        return f"{type(e).__name__}: {lines[0][:150]}"
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (raised in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_frame.f_code.co_name})" if tb else ""
    return f"{type(e).__name__}{where}"


def _try(module: str, kernel: str, optimizer: str, manual: bool, rows: int, dim: int
         ) -> tuple[str, str] | frozenset[str]:
    """(where it failed, error), or the fbgemm ops of one forward and backward that ran with rows of the right
    shape."""
    table_rows = {f: rows for f in FEATURES}
    model: nn.Module = (SequenceLookup if module == "ec" else BagLookup)(table_rows, dim, torch.device("meta"))
    cls, kwargs = OPTIMIZERS[optimizer]
    stage = "build"
    try:
        if kernel != "dense":
            apply_optimizer_in_backward(cls, embedding_parameters(model), dict(kwargs))
        sharders = [_EcEvery(), _EbcEvery()]
        stage = "plan"
        if manual:
            coll = model.ec if module == "ec" else model.ebc  # type: ignore[union-attr]
            mod_plan = construct_module_sharding_plan(coll, {f"t_{f}": table_wise(0, "cpu", kernel) for f in FEATURES},
                                                      sharder=sharders[0 if module == "ec" else 1], local_size=1,
                                                      world_size=1, device_type="cpu")
            sharding_plan = ShardingPlan({"ec" if module == "ec" else "ebc": mod_plan})
        else:
            constraint = TableShardingConfig(sharding_types=["table_wise"], compute_kernels=[kernel])
            cfg = ShardingConfig(tables={f"t_{f}": constraint for f in FEATURES}, batch_size=4)
            sharding_plan = plan(model, cfg, {}, build_topology(1, 1, torch.device("cpu"), cfg), sharders)
        stage = "shard"
        dmp = shard_model(model, sharding_plan, sharders, torch.device("cpu"))
        stage = "forward"
        n = 16
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(FEATURES), values=torch.arange(2 * n) % rows,
                                                  lengths=torch.full((2 * n // 4,), 4, dtype=torch.int32))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = dmp(kjt)
            values: list[torch.Tensor] = [out[f].values() for f in FEATURES] if module == "ec" else [out]
            want = [(n, dim)] * 2 if module == "ec" else [(n, 2 * dim)]
            if [tuple(v.shape) for v in values] != want:
                return stage, f"wrong output: rows {[tuple(v.shape) for v in values]}, expected {want}"
            stage = "backward"
            torch.autograd.backward(values, [torch.ones_like(v) for v in values])
    except Exception as e:  # noqa: BLE001  (reported, not handled)
        return stage, _first_line(e)
    return frozenset(e.key for e in prof.key_averages() if e.key.startswith("fbgemm::"))


def probe(dim: int = 8, rows: int = 100) -> list[dict[str, str]]:
    """Every combination outside the sweep: ``{"variant", "planner", "by_hand"}``, each ``<stage>: <error>`` or
    ``runs`` (with ``, same fbgemm ops as fused`` when its forward and backward called exactly the ops of the
    ``fused`` kernel); ``by_hand`` (a table-wise plan made without the planner) only where the planner failed.
    """
    cases = [("ec", "fused", "adam"), ("bags", "fused", "adam"), ("ec", "dense", "sgd")]
    cases += [(m, k, "sgd") for m in ("ec", "bags") for k in ALL_KERNELS if k not in ("fused", "dense")]
    fused_ops = {m: _try(m, "fused", "sgd", False, rows, dim) for m in ("ec", "bags")}

    def said(got: tuple[str, str] | frozenset[str], module: str) -> str:
        if isinstance(got, tuple):
            return ": ".join(got)
        return "runs, same fbgemm ops as fused" if got == fused_ops[module] else f"runs ({sorted(got)})"

    out = []
    for module, kernel, optimizer in cases:
        got = _try(module, kernel, optimizer, False, rows, dim)
        row = {"variant": f"{module}/{kernel}/{optimizer}", "planner": said(got, module), "by_hand": "-"}
        if isinstance(got, tuple) and got[0] == "plan":
            row["by_hand"] = said(_try(module, kernel, optimizer, True, rows, dim), module)
        out.append(row)
    return out


def _main() -> None:
    warnings.simplefilter("ignore")
    for name in ("torchrec", "torch.fx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for r in probe():
            print(f"{r['variant']:<32} planner: {r['planner']}\n{'':<32} by hand: {r['by_hand']}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _main()
