"""A run's step schedule: how many optimizer steps it takes, when it evaluates, and where its training stream
begins, also after a resume on another number of ranks (elastic resume).

A training stream of exact epochs (``train.epochs``) is a *segment*: it begins at optimizer step
``base_step`` in epoch ``start.epoch`` with the positions ``start.remaining`` of that epoch left
(:class:`datasets.epochs.StreamStart`), and the loader's ``start_step`` counts batches from there. A fresh run
is the segment ``(0, StreamStart())``. A checkpoint records its segment; a resume on the same world size keeps
it (the stream is a pure function of the step), a resume on another world size starts a new segment at the
checkpoint's step with the rows no rank had read yet (:func:`datasets.epochs.stream_after`), so every epoch
still reads each row once. The infinite stream (``train.max_steps``) depends on the world size and is resumed
only on the one that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from datasets.epochs import EpochLayout, StreamStart, stream_after, stream_layouts
from datasets.reader import count_rows, steps_per_epoch, stream_steps
from datasets.schema import DataError
from launch.config import ExperimentConfig

__all__ = ["Segment", "eval_points", "resumed_segment", "segment_layouts", "total_steps"]


@dataclass(frozen=True)
class Segment:
    """Where this run's training stream begins (see the module docstring)."""

    base_step: int = 0
    start: StreamStart = field(default_factory=StreamStart)

    def to_json(self) -> dict[str, Any]:
        return {"base_step": self.base_step, "start": self.start.to_json()}

    @staticmethod
    def from_json(d: Optional[dict[str, Any]]) -> "Segment":
        if not d:
            return Segment()
        return Segment(int(d.get("base_step", 0)), StreamStart.from_json(d.get("start")))


def _check_steps(cfg: ExperimentConfig, world_size: int) -> int:
    spe = steps_per_epoch(cfg.data, world_size)
    if spe < 1:  # what the reader would raise, before training "0 epochs" and reporting success
        raise DataError(
            f"{cfg.data.train_paths}: {count_rows(cfg.data.train_paths)} rows give no step per epoch with"
            f" world_size x batch_size = {world_size} x {cfg.data.batch_size}"
            + (" and data.drop_last=true" if cfg.data.drop_last else "")
        )
    return spe


def segment_layouts(cfg: ExperimentConfig, world_size: int, seg: Segment) -> list[tuple[int, EpochLayout]]:
    """``(epoch, layout)`` of every epoch of the segment's stream (exact epochs only)."""
    d = cfg.data
    return stream_layouts(count_rows(d.train_paths), world_size, max(d.num_workers, 1), d.batch_size, d.drop_last,
                          cfg.train.epochs, seg.start)


def total_steps(cfg: ExperimentConfig, world_size: int, seg: Optional[Segment] = None) -> int:
    """The run's optimizer steps: ``epochs * steps_per_epoch`` with ``train.epochs`` (after a resize: the
    segment's base step plus its stream's batches), else ``train.max_steps``."""
    if cfg.train.epochs:
        spe = _check_steps(cfg, world_size)
        if seg is None or seg == Segment():
            return cfg.train.epochs * spe
        return seg.base_step + stream_steps(cfg.data, world_size, cfg.train.epochs, seg.start)
    return cfg.train.max_steps


def eval_points(cfg: ExperimentConfig, world_size: int, total: int, seg: Optional[Segment] = None) -> list[int]:
    """Steps after which the validation split is evaluated (the last step always is).

    ``train.eval_every``: every that many steps. ``train.evals_per_epoch = n``: after every ``1/n`` of an epoch's
    rows, i.e. ``e * S + max(1, round(k * S / n))``; in an epoch a resized resume entered part-way, the points
    still ahead, at the same shares of the epoch's rows.
    """
    points = {total}
    t = cfg.train
    if t.eval_every:
        points.update(range(t.eval_every, total, t.eval_every))
    if t.evals_per_epoch and t.epochs:
        seg = seg or Segment()
        rows = count_rows(cfg.data.train_paths)
        per_step = world_size * cfg.data.batch_size
        for _, lay in segment_layouts(cfg, world_size, seg):
            first = seg.base_step + lay.first_step
            done = 0 if lay.positions is None else rows - lay.rows  # rows of this epoch read before the segment
            for k in range(1, t.evals_per_epoch + 1):
                if lay.positions is None:
                    points.add(first + max(1, round(k * lay.steps / t.evals_per_epoch)))
                    continue
                ahead = k * rows / t.evals_per_epoch - done
                if k == t.evals_per_epoch:  # after all of the epoch's rows: its last step
                    points.add(first + lay.steps)
                elif ahead > 0:
                    points.add(first + min(lay.steps, max(1, round(ahead / per_step))))
    return sorted(p for p in points if 0 < p <= total)


def resumed_segment(
    cfg: ExperimentConfig, saved: Optional[dict[str, Any]], saved_world: int, step: int, world_size: int
) -> Segment:
    """The segment a run resumed at ``step`` trains: the checkpoint's own on the same world size, else a new one
    that begins at ``step`` with the rows the checkpoint's ranks had not read (exact epochs only)."""
    seg = Segment.from_json(saved)
    if saved_world == world_size or not cfg.train.epochs:
        return seg
    old = segment_layouts(cfg, saved_world, seg)
    return Segment(step, stream_after(old, step - seg.base_step, cfg.train.epochs))
