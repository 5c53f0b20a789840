"""Exact epochs: which rows of the training set each rank and DataLoader worker reads in each epoch.

Arithmetic on row counts and footers only; :class:`datasets.reader.ParquetStream` reads what it says.

Global order
    Epoch ``e`` orders the ``N`` training rows: the units (whole row groups) permuted with
    ``np.random.default_rng([seed, e])``, the rows of every unit permuted with
    ``np.random.default_rng([seed, e, file, row_group, start])`` (both only when ``shuffle``), concatenated.
    *Positions* ``0 .. N - 1`` index that order.

Steps and ranks
    With ``G = world_size * batch_size`` rows per global step, an epoch has ``S = ceil(N / G)`` steps, or
    ``floor(N / G)`` with ``drop_last``, which skips the last ``N - S * G`` positions (other rows every epoch
    when shuffled). The ``U`` used positions are cut into contiguous ranges balanced by rows: rank ``r`` gets
    ``U // world_size`` rows, one more when ``r < U % world_size``. A rank's epoch is ``S`` batches, i.e.
    ``S * batch_size`` slots; slot ``p`` holds the rank's ``p``-th position, slots past its rows are padding
    (at most ``batch_size`` per rank and epoch, none with ``drop_last``).

Workers
    Batch ``k = e * S + j`` of a rank's stream (batch ``j`` of epoch ``e``) comes from worker ``k % W``, the
    DataLoader's round robin. In epoch ``e`` worker ``w`` yields the ``c_w = |{j < S : (e S + j) % W = w}|``
    batches of slots ``[f_w B, (f_w + c_w) B)`` with ``f_w = c_0 + ... + c_{w-1}``: a contiguous part of the
    rank's range, so workers read disjoint rows (a row group only by the readers whose ranges overlap it).

Resuming on another number of ranks (elastic resume)
    A stream may begin inside an epoch with only some of its positions left (:class:`StreamStart`): a run
    resumed on another world size from a checkpoint taken mid-epoch. That first epoch lays out the
    ``M`` remaining positions exactly as a whole epoch lays out ``N`` (*virtual* positions ``0 .. M - 1``, the
    remaining ones in global order), with ``ceil(M / G)`` steps (``floor`` with ``drop_last``); later epochs
    are whole. :func:`stream_after` computes the remaining positions of any stream after ``k`` of its steps,
    so each epoch still reads every row once (the data position is carried in rows, not steps).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from datasets.files import Unit

__all__ = [
    "EpochLayout",
    "StreamStart",
    "epoch_order",
    "merge_intervals",
    "row_order",
    "spans",
    "stream_after",
    "stream_layouts",
    "subtract_intervals",
]

Intervals = tuple[tuple[int, int], ...]


def merge_intervals(intervals: Sequence[Sequence[int]]) -> Intervals:
    """Sorted, disjoint, non-empty ``[lo, hi)`` intervals covering the same positions as ``intervals``."""
    out: list[list[int]] = []
    for lo, hi in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class StreamStart:
    """Where an exact-epoch stream begins.

    Attributes:
        epoch: the first epoch of the stream.
        remaining: the positions of ``epoch`` still to read, as sorted disjoint ``[lo, hi)`` intervals of its
            global order; None: all of them (a whole epoch).
    """

    epoch: int = 0
    remaining: Optional[Intervals] = None

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "remaining": None if self.remaining is None else [list(x) for x in self.remaining]}

    @staticmethod
    def from_json(d: Optional[dict]) -> "StreamStart":
        if not d:
            return StreamStart()
        rem = d.get("remaining")
        return StreamStart(int(d.get("epoch", 0)), None if rem is None else merge_intervals(rem))


@dataclass(frozen=True)
class EpochLayout:
    """The split of one epoch's positions into ranks, workers and batches (see the module docstring).

    Attributes:
        rows: ``N``, training rows (or ``M``, the remaining positions, when ``positions`` is given).
        world_size: ranks.
        workers: ``W = max(num_workers, 1)``, readers per rank.
        batch_size: rows per batch and rank.
        drop_last: drop the last partial global batch instead of padding it.
        first_step: the stream batch this epoch begins at (the workers' round robin continues across epochs).
        positions: None, or the global positions this epoch reads (sorted disjoint intervals, ``rows`` in
            all): virtual position ``p`` is the ``p``-th of them.
    """

    rows: int
    world_size: int
    workers: int
    batch_size: int
    drop_last: bool
    first_step: int = 0
    positions: Optional[Intervals] = None

    @property
    def steps(self) -> int:
        """``S``, batches of every rank per epoch."""
        per_step = self.world_size * self.batch_size
        return self.rows // per_step if self.drop_last else math.ceil(self.rows / per_step)

    @property
    def used_rows(self) -> int:
        """``U``, positions read every epoch."""
        return self.steps * self.world_size * self.batch_size if self.drop_last else self.rows

    @property
    def dropped_rows(self) -> int:
        """Rows not read in each epoch (0 without ``drop_last``)."""
        return self.rows - self.used_rows

    def rank_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)``, the (virtual) positions of ``rank``."""
        base, extra = divmod(self.used_rows, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def worker_blocks(self, epoch: int, worker: int) -> tuple[int, int]:
        """``(f_w, c_w)``: worker ``worker``'s batches of this epoch are the rank's batch slots
        ``f_w .. f_w + c_w - 1``, in stream order. (``epoch`` is unused: kept for callers.)"""
        counts = [self._count(w) for w in range(worker + 1)]
        return sum(counts[:-1]), counts[-1]

    def consumed(self, epoch: int, worker: int, start_step: int) -> int:
        """How many of worker ``worker``'s batches of this epoch come before stream batch ``start_step``."""
        before = start_step - self.first_step  # batches of this epoch before the resume point
        first = self._first(worker)
        if before <= first:
            return 0
        return min(self._count(worker), (before - first + self.workers - 1) // self.workers)

    def real(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The global position intervals of virtual positions ``[lo, hi)``, in order."""
        if self.positions is None:
            return [(lo, hi)] if hi > lo else []
        out, offset = [], 0
        for a, b in self.positions:
            n = b - a
            s, e = max(lo, offset), min(hi, offset + n)
            if e > s:
                out.append((a + s - offset, a + e - offset))
            offset += n
            if offset >= hi:
                break
        return out

    def consumed_positions(self, start_step: int) -> Intervals:
        """The global positions every rank and worker has read before stream batch ``start_step``."""
        got = []
        for rank in range(self.world_size):
            start, stop = self.rank_range(rank)
            for w in range(self.workers):
                f, _ = self.worker_blocks(0, w)
                n = self.consumed(0, w, start_step)
                lo, hi = min(stop, start + f * self.batch_size), min(stop, start + (f + n) * self.batch_size)
                got.extend(self.real(lo, hi))
        return merge_intervals(got)

    def _first(self, worker: int) -> int:
        """The first ``j`` with ``(first_step + j) % W == worker``."""
        return (worker - self.first_step) % self.workers

    def _count(self, worker: int) -> int:
        first = self._first(worker)
        return 0 if first >= self.steps else (self.steps - 1 - first) // self.workers + 1


def stream_layouts(
    rows: int, world_size: int, workers: int, batch_size: int, drop_last: bool, epochs: int,
    start: Optional[StreamStart] = None,
) -> list[tuple[int, EpochLayout]]:
    """``(epoch, layout)`` of every epoch of a stream of ``epochs`` epochs that begins at ``start``."""
    start = start or StreamStart()
    out, step = [], 0
    for epoch in range(start.epoch, epochs):
        rem = start.remaining if epoch == start.epoch else None
        n = rows if rem is None else sum(b - a for a, b in rem)
        layout = EpochLayout(n, world_size, workers, batch_size, drop_last, step, rem)
        out.append((epoch, layout))
        step += layout.steps
    return out


def stream_after(layouts: Sequence[tuple[int, EpochLayout]], steps: int, epochs: int) -> StreamStart:
    """Where a stream laid out as ``layouts`` stands after ``steps`` of its batches: the epoch it is in and
    the positions of that epoch no rank has read yet (``StreamStart(epochs)`` once every epoch is done)."""
    firsts = [layout.first_step for _, layout in layouts]
    i = bisect.bisect_right(firsts, steps) - 1
    if i < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    epoch, layout = layouts[i]
    if steps >= layout.first_step + layout.steps:  # past the last epoch
        return StreamStart(epochs)
    if steps == layout.first_step:
        return StreamStart(epoch, layout.positions)
    used = layout.real(0, layout.used_rows)  # with drop_last the epoch's tail is not read in any case
    return StreamStart(epoch, subtract_intervals(used, layout.consumed_positions(steps)))


def subtract_intervals(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> Intervals:
    """The positions of intervals ``a`` not in intervals ``b``, as sorted disjoint intervals."""
    out: list[tuple[int, int]] = []
    cuts = merge_intervals(b)
    for lo, hi in merge_intervals(a):
        cur = lo
        for c_lo, c_hi in cuts:
            if c_hi <= cur or c_lo >= hi:
                continue
            if c_lo > cur:
                out.append((cur, c_lo))
            cur = max(cur, c_hi)
        if cur < hi:
            out.append((cur, hi))
    return merge_intervals(out)


def epoch_order(units: Sequence[Unit], seed: int, epoch: int, shuffle: bool) -> list[Unit]:
    """The units in the order of ``epoch``."""
    if not shuffle:
        return list(units)
    return [units[i] for i in np.random.default_rng([seed, epoch]).permutation(len(units))]


def row_order(unit: Unit, seed: int, epoch: int, shuffle: bool) -> Optional[np.ndarray]:
    """The order of ``unit``'s rows in ``epoch``: a permutation ``[unit.num_rows]``, None for file order."""
    if not shuffle:
        return None
    return np.random.default_rng([seed, epoch, unit.file, unit.row_group, unit.start]).permutation(unit.num_rows)


def spans(order: Sequence[Unit], lo: int, hi: int) -> Iterator[tuple[Unit, int, int]]:
    """``(unit, a, b)`` for every unit of ``order`` that positions ``[lo, hi)`` touch, in order: its rows
    ``a:b`` (in the unit's row order) hold those positions."""
    start = 0
    for unit in order:
        stop = start + unit.num_rows
        if stop > lo and start < hi:
            yield unit, max(lo, start) - start, min(hi, stop) - start
        if stop >= hi:
            return
        start = stop
