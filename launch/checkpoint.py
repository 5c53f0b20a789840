"""Atomic distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<run_dir>/checkpoints``::

    step_00000020/          a complete checkpoint: DCP shards of model + optimizer state,
        .metadata, __*.distcp   rng_rank<R>.pt (each rank's RNG state), meta.json (step, world size, ...)
    latest                  the name of the newest complete checkpoint

A checkpoint is written into ``.tmp_step_XXXXXXXX`` and renamed only after every rank has finished, then
``latest`` is replaced atomically (write a temp file, ``os.replace``). A kill during a save leaves a stale temp
directory and the previous ``latest``: the previous checkpoint stays loadable. Stale temp directories are removed
by the next save. The data position is the step count: the training stream is a pure function of the step
(see :func:`datasets.reader.train_loader`), so resuming at step S replays the stream from batch S. Exact-epoch
runs also record where their stream began (``stream``) and resume on any number of ranks: DCP reshards the
tables and optimizer state, and the data position is carried over in rows (:mod:`launch.schedule`).

The directory must be on a file system every rank sees (a shared mount on multi-node clusters).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"


@dataclass
class CheckpointMeta:
    """What ``meta.json`` records besides the tensors.

    Attributes:
        step: optimizer steps taken (the data position: the training stream is a pure function of it).
        world_size: ranks that wrote the checkpoint.
        samples_seen: global samples trained on.
        id_fixes: ids rewritten by the reader's hash / clip policy in the trained batches, summed over ranks,
            per id feature in schema order.
        data_position: what the step count means: the settings the training stream is a function of
            (batch size, seed, files, workers, truncation, ...). Resuming under different ones is refused.
        best: the best validation so far (``metric``, ``mode``, ``value``, ``step``).
        history: the validation metric at every evaluation so far (``[{"step": s, <metric>: v}, ...]``).
        stream: exact epochs: where the run's training stream began (:class:`launch.schedule.Segment` as JSON);
            with it a run resumed on another world size carries the data position over in rows.
    """

    step: int
    world_size: int
    samples_seen: int
    id_fixes: Optional[list[int]] = None
    data_position: Optional[dict[str, Any]] = None
    best: Optional[dict[str, Any]] = None
    history: Optional[list[dict[str, Any]]] = None
    stream: Optional[dict[str, Any]] = None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(ckpt_dir: Path, step: int, state: dict[str, Any], meta: CheckpointMeta, keep: int) -> Path:
    """Writes ``state`` (a DCP state dict: ShardedTensors allowed) atomically; collective over all ranks.

    Args:
        ckpt_dir: ``<run_dir>/checkpoints``.
        step: the number of optimizer steps taken.
        state: e.g. ``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}``.
        meta: recorded in ``meta.json``.
        keep: complete checkpoints to keep (>= 1).

    Returns:
        The final directory of this checkpoint.
    """
    name = f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_{name}"
    final = ckpt_dir / name
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. after a resume at the last step)
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps(meta.__dict__))
        os.replace(tmp, final)
        _write_latest(ckpt_dir, name)
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p != final)
        for old in done[: max(0, len(done) - max(0, keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / LATEST)


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None.

    Raises:
        RuntimeError: ``latest`` is unreadable or names a directory that is not a complete checkpoint.
    """
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise RuntimeError(f"{ckpt_dir} exists and is not a directory (it should hold the run's checkpoints)")
    pointer = ckpt_dir / LATEST
    if pointer.exists() and not pointer.is_file():
        raise RuntimeError(f"{pointer} is not a file (it should hold the name of the newest checkpoint)")
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{pointer}: cannot be read ({e})") from None
    path = ckpt_dir / name
    if not name or not (path / "meta.json").is_file():
        raise RuntimeError(
            f"{pointer} names {name!r}, which is not a complete checkpoint (no {name}/meta.json): remove"
            f" {pointer} to start afresh, or point it at a complete step_* directory"
        )
    try:
        read_meta(path)
    except (OSError, ValueError, TypeError) as e:
        raise RuntimeError(f"{path / 'meta.json'}: not a valid checkpoint description ({e})") from None
    if not (path / ".metadata").is_file():  # DCP's own description of the shards, written last by dcp.save
        raise RuntimeError(
            f"{pointer} names {name!r}, which is not a complete checkpoint (no {name}/.metadata): remove"
            f" {pointer} to start afresh, or point it at a complete step_* directory"
        )
    return path


def read_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((path / "meta.json").read_text()))


def check_compatible(
    path: Path, meta: CheckpointMeta, world_size: int, data_position: Optional[dict[str, Any]], elastic: bool = False
) -> None:
    """Raises RuntimeError when the checkpoint was written on another data stream, or by another world size
    unless ``elastic`` (exact epochs: the data position is then carried over in rows, the tables resharded)."""
    if meta.world_size != world_size and not elastic:
        raise RuntimeError(
            f"{path} was written by {meta.world_size} ranks, this run has {world_size}: the infinite training stream"
            " (train.max_steps) is a function of the world size, so its position cannot be carried over; resume with"
            f" {meta.world_size} ranks, or train by exact epochs (train.epochs), which resume on any number of ranks"
        )
    saved = meta.data_position
    if data_position is None:
        return
    if saved is None or saved == data_position:
        return
    diff = sorted(k for k in set(data_position) | set(saved) if data_position.get(k) != saved.get(k))
    details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {data_position.get(k)!r}" for k in diff)
    raise RuntimeError(
        f"{path} was trained on a different data stream ({details}): resuming would replay the wrong batches;"
        " start a new run_dir or restore those settings"
    )


def find(run_dir: Path, which: str) -> Optional[Path]:
    """A run's checkpoint for the offline commands: ``best`` (``run_dir/best``), ``latest`` (``run_dir/checkpoints``)
    or ``which`` itself when it is a checkpoint folder (holds DCP's ``.metadata``); None when there is none."""
    if which in ("best", "latest"):
        return latest(run_dir / ("best" if which == "best" else "checkpoints"))
    path = Path(which)
    return path if (path / ".metadata").is_file() else None


def load_model(path: Path, state: dict[str, Any]) -> None:
    """Loads only ``state["model"]`` from a checkpoint (e.g. the best one, for the test split); RNG untouched."""
    dcp.load(state, checkpoint_id=str(path))


def load(
    path: Path, state: dict[str, Any], data_position: Optional[dict[str, Any]] = None, elastic: bool = False
) -> CheckpointMeta:
    """Loads a checkpoint in place into ``state`` (the same structure ``save`` got); restores this rank's RNG.

    DCP reshards: the checkpoint may come from another plan or world size (``elastic``), each rank reading the
    parts of every tensor its own shards hold. The RNG state is restored only on the world size that wrote it.
    Refuses (RuntimeError) a checkpoint written by another world size unless ``elastic`` or, when
    ``data_position`` is given, on another data stream.

    The caller then passes ``state["model"]`` / ``state["optim"]`` to ``load_state_dict``.
    """
    meta = read_meta(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_compatible(path, meta, world, data_position, elastic)
    dcp.load(state, checkpoint_id=str(path))
    if meta.world_size == world:
        set_rng_state(torch.load(path / f"rng_rank{_rank()}.pt", weights_only=False))
    return meta
