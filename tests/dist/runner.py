"""Runs a function in ``world_size`` gloo processes and returns what each rank returned.

    results = run_workers(my_check, world_size=2, args=(sharding_type,))

``fn(rank, world_size, *args)`` runs after ``init_process_group("gloo")`` over a FileStore in a fresh temporary
directory (no ports, so parallel test runs cannot collide). ``fn`` and ``args`` must be picklable (module-level
functions, ``functools.partial`` of them, dataclasses): children are started with ``spawn``. An exception in any
child fails the caller with the child's rank and traceback; a run longer than ``timeout_s`` kills the
children and fails.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


class WorkerError(RuntimeError):
    """A child process raised; the message carries its rank and traceback."""


def _child(index: int, fn: Callable[..., Any], world_size: int, args: Sequence[Any], tmp: str) -> None:
    rank = index
    out = Path(tmp) / f"result_{rank}.pt"
    try:
        torch.set_num_threads(1)  # world_size processes share the machine's cores
        store = dist.FileStore(os.path.join(tmp, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001  (reported to the parent)
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise SystemExit(1)


def run_workers(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes; returns the results by rank.

    Raises:
        WorkerError: a child raised (the first failing rank's traceback; other ranks' are appended) or exited
            without a result, or the run exceeded ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="zoo_dist_") as tmp:
        ctx = mp.start_processes(
            _child, args=(fn, world_size, tuple(args), tmp), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while True:
            try:
                if ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                    break
            except ProcessException:
                break  # a child failed; join() has terminated the others; report from the result files
            if time.monotonic() > deadline:
                timed_out = True
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                break
        results: list[Any] = []
        errors: list[str] = []
        for rank in range(world_size):
            path = Path(tmp) / f"result_{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result (exit code {ctx.processes[rank].exitcode})")
                results.append(None)
                continue
            r = torch.load(path, weights_only=False)
            if r["ok"]:
                results.append(r["result"])
            else:
                errors.append(f"rank {rank} raised:\n{r['error']}")
                results.append(None)
        if timed_out:
            raise WorkerError(f"workers did not finish within {timeout_s:.0f}s\n" + "\n".join(errors))
        if errors:
            # The failing rank's own error first; the others usually died waiting on it.
            errors.sort(key=lambda e: ("raised" not in e, "Connection" in e or "gloo" in e))
            raise WorkerError("\n".join(errors))
        return results
