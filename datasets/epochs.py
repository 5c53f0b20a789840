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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from datasets.files import Unit

__all__ = ["EpochLayout", "epoch_order", "row_order", "spans"]


@dataclass(frozen=True)
class EpochLayout:
    """The split of one epoch's positions into ranks, workers and batches (see the module docstring).

    Attributes:
        rows: ``N``, training rows.
        world_size: ranks.
        workers: ``W = max(num_workers, 1)``, readers per rank.
        batch_size: rows per batch and rank.
        drop_last: drop the last partial global batch instead of padding it.
    """

    rows: int
    world_size: int
    workers: int
    batch_size: int
    drop_last: bool

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
        """``[start, stop)``, the positions of ``rank``."""
        base, extra = divmod(self.used_rows, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def worker_blocks(self, epoch: int, worker: int) -> tuple[int, int]:
        """``(f_w, c_w)``: worker ``worker``'s batches of ``epoch`` are the rank's batch slots
        ``f_w .. f_w + c_w - 1``, in stream order."""
        counts = [self._count(epoch, w) for w in range(worker + 1)]
        return sum(counts[:-1]), counts[-1]

    def consumed(self, epoch: int, worker: int, start_step: int) -> int:
        """How many of worker ``worker``'s batches of ``epoch`` come before stream batch ``start_step``."""
        before = start_step - epoch * self.steps  # batches of this epoch before the resume point
        first = self._first(epoch, worker)
        if before <= first:
            return 0
        return min(self._count(epoch, worker), (before - first + self.workers - 1) // self.workers)

    def _first(self, epoch: int, worker: int) -> int:
        """The first ``j`` with ``(epoch * S + j) % W == worker``."""
        return (worker - epoch * self.steps) % self.workers

    def _count(self, epoch: int, worker: int) -> int:
        first = self._first(epoch, worker)
        return 0 if first >= self.steps else (self.steps - 1 - first) // self.workers + 1


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
