"""Entry point: ``python -m launch.train --config configs/experiments/<name>.yaml [key.sub=value ...]``.

Run directly (one process) or under torchrun / TorchX (``launch/components.py``), which set RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Rank 0 prints the metrics as one JSON object on the
last line of standard output and writes it to ``<run_dir>/metrics.json``.

Exit status: 0 done; 2 config error (before any process group exists); 3 bad input data (the message names
file, row group, row and column; the newest complete checkpoint is untouched).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import sys

import torch.distributed as dist

from datasets.schema import DataError
from launch.config import ConfigError, Device, load_config, validate_experiment
from launch.trainer import DistEnv, run


def _env() -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(message: str) -> str:
    """A message listing several problems on separate lines, as one line (the exit-2/3 contract)."""
    out = ""
    for line in (x.strip() for x in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """The default process group, from torchrun's environment (``env://``), on a store private to this attempt.

    Under torchrun's elastic agent every worker of every restart of the group connects to the same TCP store
    (the rendezvous's, shared by default), and a process group's keys (rank addresses, barrier counters) carry the
    same names in every attempt. A restarted group would then read the dead workers' addresses and wait on them
    (gloo: connection refused or a hang). Prefixing the store with ``TORCHELASTIC_RESTART_COUNT`` gives each
    attempt fresh keys; a plain run (no restart count) uses attempt 0.
    """
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"/zoo/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, merged last")
    args = parser.parse_args(argv)
    try:
        cfg, spec, resolved = load_config(args.config, args.overrides)
        validate_experiment(cfg, spec)
    except ConfigError as e:
        print(f"config error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    env = _env()
    # On GPUs, CPU tensors (evaluation step agreement, timings) still need a backend: gloo beside nccl.
    backend = "cpu:gloo,cuda:nccl" if cfg.train.device == Device.cuda else "gloo"
    if "MASTER_ADDR" not in os.environ:  # plain single-process run
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    init_process_group(backend, datetime.timedelta(minutes=30))
    try:
        metrics = run(cfg, spec, resolved, env)
    except DataError as e:
        # Bad input: one clear message (file, row group, row, column); the last complete checkpoint stays. From a
        # loader worker the message carries the worker's traceback first: keep the DataError's own text.
        msg = str(e)
        if "Original Traceback" in msg:
            msg = msg.rsplit("DataError: ", 1)[-1].strip()
        print(f"[rank {env.rank}] data error: {_one_line(msg)}", file=sys.stderr, flush=True)
        return 3
    except ConfigError as e:  # found once the run directory is known (checkpoints from another run)
        print(f"[rank {env.rank}] config error: {_one_line(str(e))}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Free the sharded model, pipeline and optimizer state while the interpreter is fully alive, then
        # close the process groups (gloo's worker threads are joined here, not at interpreter shutdown).
        gc.collect()
        dist.destroy_process_group()
    if env.rank == 0:
        print(json.dumps(metrics, sort_keys=True), flush=True)
    return 0


def _exit(code: int) -> None:
    """Ends the process without interpreter finalization, once everything is written and flushed.

    Native threads of the libraries (gloo, fbgemm, arrow) that outlive ``main`` can abort the process while
    Python tears itself down (``terminate called without an active exception``, SIGABRT) after a run that
    finished and printed its metrics; the launcher would then report the rank as failed. Nothing is left to
    do at that point: files are closed, the process groups destroyed, stdout and stderr flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
