"""Streaming pyarrow parquet readers yielding :class:`datasets.batch.Batch`, split by rank and worker.

Modules
    :mod:`datasets.files` finds files, reads footers and makes units (row groups, or parts of them);
    :mod:`datasets.decode` validates and decodes a unit into :class:`datasets.rows.Rows`; this module
    assigns units to readers and cuts rows into batches; :mod:`datasets.epochs` lays out exact epochs.

Readers (infinite training stream, evaluation)
    A rank with ``W = max(num_workers, 1)`` DataLoader workers has ``W`` readers; the global reader index is
    ``rank * W + worker``, out of ``R = world_size * W``. Reader ``r`` reads units ``r, r + R, r + 2R, ...``
    of the (per-epoch shuffled, for training) unit list, so readers' shares are disjoint and together
    cover every unit exactly once per epoch.

Ordering convention and truncation
    Sequence columns are chronological: the oldest behaviour first and the most recent behaviour last.
    Sequence columns form groups (:meth:`SchemaConfig.sequence_groups`) whose columns have equal lengths in
    every row. Each group ``g`` is truncated to the *last* ``L_g`` items of every one of its columns (the
    most recent behaviours; the columns stay aligned), where ``L_g`` is the smaller positive one of
    ``max_sequence_length`` and the loader's ``sequence_caps[g]`` (a model's declared need; 0 or absent =
    no cap); neither positive keeps everything. Rows keep the file order except where training shuffles
    them.

Training stream (:func:`train_loader`)
    Infinite with ``epochs=None`` (the default). Reader ``r`` walks epochs ``e = 0, 1, ...``; in epoch ``e``
    the unit list is permuted with ``np.random.default_rng([seed, e])`` and the rows of a unit
    with ``np.random.default_rng([seed, e, file, row_group, start])`` (when ``shuffle``). Rows are
    concatenated across units and epochs and cut into batches of exactly ``batch_size`` rows, so the stream
    is a pure function of ``(seed, rank, world_size, num_workers, step)``. Whole units go to readers, so
    over a fixed number of steps some rows are read more often than others. The DataLoader yields batch
    ``k`` of a rank from worker ``k % W``; resuming at ``start_step = s`` rotates the workers' roles by
    ``s`` and lets each skip its already consumed batches using row-group metadata only (the one unit a
    resume point falls inside is read; skipped units are not).

Exact epochs (:func:`train_loader` with ``epochs=E``)
    Finite: ``E * steps_per_epoch`` batches per rank. Every epoch reads every training row exactly once
    across all ranks and workers (``drop_last=False``: the last global batch is padded with rows
    ``valid = False``, ``weight = 0``, copies of the rank's last row), or all but
    :func:`dropped_rows_per_epoch` rows (``drop_last=True``; other rows each epoch when shuffled). Ranks
    get contiguous, row-balanced ranges of a per-epoch shuffled global row order and workers contiguous
    parts of their rank's range (:mod:`datasets.epochs`); every rank takes :func:`steps_per_epoch` steps per
    epoch. Resuming is exact in the same way as for the infinite stream, also mid-epoch.

Evaluation stream (:func:`eval_loader`)
    Finite, unshuffled: every row of ``eval_paths`` exactly once across all ranks and workers. A reader's
    last batch is padded to ``batch_size`` with copies of a real row marked ``valid = False`` and
    ``weight = 0``; readers with fewer batches than the busiest reader append whole padding batches, so
    every rank yields the same number of batches (:func:`eval_batches`, ``W * max_reader_batches``) and
    collectives in a sharded model stay in lockstep.

Validation
    File readability and every column's presence and arrow type are checked when a loader is built,
    before anything is yielded (:func:`datasets.files.open_files`); every unit's values when it is read
    (:mod:`datasets.decode`). Each problem raises one :class:`DataError` naming the file, the row group, the
    row (index within the file), the column and what was expected.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datasets.batch import Batch
from datasets.config import DataConfig
from datasets.decode import Where, decode
from datasets.epochs import EpochLayout, StreamStart, epoch_order, row_order, spans, stream_layouts
from datasets.files import Unit, count_rows, expand_paths, make_units, open_files, open_parquet, row_group_units
from datasets.rows import Rows, rebatch
from datasets.schema import DataError

__all__ = [
    "DataError",
    "ParquetStream",
    "count_rows",
    "dropped_rows_per_epoch",
    "eval_batches",
    "eval_loader",
    "expand_paths",
    "steps_per_epoch",
    "stream_steps",
    "train_loader",
]


def _group_caps(cfg: DataConfig, sequence_caps: Mapping[str, int]) -> dict[str, int]:
    """Every sequence group -> the number of last items kept (0 = all): the smaller positive one of
    ``cfg.max_sequence_length`` and ``sequence_caps[group]``."""
    groups = cfg.schema.sequence_groups()
    unknown = sorted(set(sequence_caps) - set(groups))
    if unknown:
        raise ValueError(
            f"sequence_caps names unknown sequence groups {unknown}; the schema's groups are {list(groups)}"
        )
    out = {}
    for group in groups:
        cap = int(sequence_caps.get(group, 0))
        if cap < 0:
            raise ValueError(f"sequence_caps[{group!r}] must be >= 0 (0 = no cap), got {cap}")
        limits = [x for x in (cfg.max_sequence_length, cap) if x > 0]
        out[group] = min(limits) if limits else 0
    return out


class ParquetStream(IterableDataset):
    """An IterableDataset of :class:`Batch` over parquet files, one rank's share.

    Build it with :func:`train_loader` / :func:`eval_loader`. Construction reads only footers and checks
    the schema; data is read lazily, one unit at a time, in the iterating process (a DataLoader worker).

    Args:
        cfg: the data config (schema, batch size, workers, shuffle, seed, id policy, truncation).
        paths: files or glob patterns.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.
        train: True for the (shuffled) training stream, False for one finite unshuffled pass.
        start_step: training only: batches of this rank's stream to skip (resume).
        sequence_caps: sequence group -> keep at most the last this many items of every column of the group
            (a model's declared need; 0 = no cap), combined with ``cfg.max_sequence_length`` by taking the
            smaller positive one.
        epochs: training only: None for the infinite stream, ``E >= 1`` for ``E`` exact epochs.
        stream_start: exact epochs only: where the stream begins (an epoch, maybe only its remaining
            positions: :class:`datasets.epochs.StreamStart`); ``start_step`` counts batches from there.

    Raises:
        DataError: exact epochs with no step per epoch (fewer rows than one global batch with
            ``drop_last``, or no rows).
        ValueError: bad rank, sizes, ``start_step`` or ``epochs``; ``sequence_caps`` names a group the schema
            does not have, or holds a negative cap.
    """

    def __init__(
        self,
        cfg: DataConfig,
        paths: Sequence[str],
        rank: int,
        world_size: int,
        train: bool,
        start_step: int = 0,
        sequence_caps: Optional[Mapping[str, int]] = None,
        epochs: Optional[int] = None,
        stream_start: Optional[StreamStart] = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if cfg.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        if start_step < 0 or (start_step and not train):
            raise ValueError(f"start_step must be >= 0 and only used for training, got {start_step}")
        if epochs is not None and (epochs < 1 or not train):
            raise ValueError(f"epochs must be None or >= 1 and only used for training, got {epochs}")
        if stream_start is not None and epochs is None:
            raise ValueError("stream_start needs exact epochs (the infinite stream always starts at its beginning)")
        cfg.schema.validate()
        self.caps = _group_caps(cfg, sequence_caps or {})
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.start_step = start_step
        self.workers = max(cfg.num_workers, 1)
        self.num_readers = world_size * self.workers
        self.epochs = epochs
        self.files = open_files(paths, cfg.schema)
        self.layout: Optional[EpochLayout] = None
        self.layouts: list[tuple[int, EpochLayout]] = []
        if epochs is None:
            self.units = make_units(self.files, self.num_readers)
        else:  # exact epochs split rows, not units: whole row groups, no reader needs a row
            self.units = row_group_units(self.files)
            self.layout = EpochLayout(
                sum(u.num_rows for u in self.units), world_size, self.workers, cfg.batch_size, cfg.drop_last
            )
            if self.layout.steps < 1:
                raise DataError(
                    f"{[m.path for m in self.files]}: {self.layout.rows} rows give no step per epoch with "
                    f"world_size x batch_size = {world_size} x {cfg.batch_size}"
                    + (" and data.drop_last=true" if cfg.drop_last else "")
                )
            start = stream_start or StreamStart()
            if start.remaining and start.remaining[-1][1] > self.layout.rows:
                raise ValueError(
                    f"stream_start names position {start.remaining[-1][1] - 1}, the training files have "
                    f"{self.layout.rows} rows (were they changed since the checkpoint?)"
                )
            self.layouts = stream_layouts(
                self.layout.rows, world_size, self.workers, cfg.batch_size, cfg.drop_last, epochs, start
            )
        self.columns = list(cfg.schema.arrow_types())
        self._handles: dict[int, pq.ParquetFile] = {}

    # -- shares

    def _share(self, epoch: int, reader: int) -> list[Unit]:
        """The units reader ``reader`` reads in ``epoch`` (in reading order)."""
        if self.train and self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.units))
            return [self.units[i] for i in order[reader :: self.num_readers]]
        return self.units[reader :: self.num_readers]

    def eval_batches_per_reader(self) -> int:
        """Batches every reader yields in evaluation: the busiest reader's ``ceil(rows / batch_size)``."""
        rows = [sum(u.num_rows for u in self._share(0, r)) for r in range(self.num_readers)]
        return max(math.ceil(n / self.cfg.batch_size) for n in rows)

    # -- reading

    def _read_unit(self, unit: Unit) -> Rows:
        meta = self.files[unit.file]
        if unit.file not in self._handles:
            if len(self._handles) >= 8:
                self._handles.pop(next(iter(self._handles)))
            self._handles[unit.file] = open_parquet(meta.path)
        try:
            table = self._handles[unit.file].read_row_group(unit.row_group, columns=self.columns)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{meta.path}: cannot read row group {unit.row_group}: {e}") from None
        expected_rows = meta.row_group_rows[unit.row_group]
        if table.num_rows != expected_rows:
            raise DataError(
                f"{meta.path}: row group {unit.row_group} has {table.num_rows} rows, its footer said "
                f"{expected_rows} when the loader was built (was the file rewritten?)"
            )
        if unit.num_rows != table.num_rows:
            table = table.slice(unit.start, unit.num_rows)
        group_first = meta.row_group_offset(unit.row_group)
        where = Where(meta.path, unit.row_group, group_first + unit.start, group_first)
        return decode(table, self.cfg.schema, self.cfg, self.caps, where)

    def _train_parts(self, reader: int, skip_rows: int) -> Iterator[Rows]:
        """Reader ``reader``'s infinite row stream, its first ``skip_rows`` rows dropped (footers only)."""
        for epoch in itertools.count():
            share = self._share(epoch, reader)
            epoch_rows = sum(u.num_rows for u in share)
            if skip_rows >= epoch_rows:
                skip_rows -= epoch_rows
                continue
            for unit in share:
                if skip_rows >= unit.num_rows:
                    skip_rows -= unit.num_rows
                    continue
                rows = self._read_unit(unit)
                if self.cfg.shuffle:
                    seed = [self.cfg.seed, epoch, unit.file, unit.row_group, unit.start]
                    rows = rows.take(np.random.default_rng(seed).permutation(len(rows))[skip_rows:])
                elif skip_rows:
                    rows = rows.slice(skip_rows, len(rows))
                skip_rows = 0
                yield rows

    def _span_rows(self, unit: Unit, epoch: int, a: int, b: int) -> Rows:
        """Rows ``a:b`` of ``unit`` in its row order of ``epoch``."""
        rows = self._read_unit(unit)
        order = row_order(unit, self.cfg.seed, epoch, self.cfg.shuffle)
        if order is None:
            return rows if (a, b) == (0, len(rows)) else rows.slice(a, b)
        return rows.take(order[a:b])

    def _epoch_parts(self, worker: int) -> Iterator[Rows]:
        """The rows (padding included) of logical worker ``worker``'s batches of every epoch, from batch
        ``start_step`` of the rank's stream on; skipped positions are never read."""
        bsz = self.cfg.batch_size
        assert self.epochs is not None
        for epoch, layout in self.layouts:
            start, stop = layout.rank_range(self.rank)
            first, count = layout.worker_blocks(epoch, worker)
            skip = layout.consumed(epoch, worker, self.start_step)
            if skip == count:
                continue
            order = epoch_order(self.units, self.cfg.seed, epoch, self.cfg.shuffle)
            lo = min(stop, start + (first + skip) * bsz)
            hi = min(stop, start + (first + count) * bsz)
            rows: Optional[Rows] = None
            for r_lo, r_hi in layout.real(lo, hi):
                for unit, a, b in spans(order, r_lo, r_hi):
                    rows = self._span_rows(unit, epoch, a, b)
                    yield rows
            pad = (count - skip) * bsz - (hi - lo)
            if pad:  # then hi == stop: padding copies the rank's last row, position stop - 1
                if rows is None:
                    ((r_lo, r_hi),) = layout.real(stop - 1, stop)
                    ((unit, a, b),) = spans(order, r_lo, r_hi)
                    rows = self._span_rows(unit, epoch, a, b)
                yield rows.slice(len(rows) - 1, len(rows)).padding(pad)

    def reader_batches(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """The batches DataLoader worker ``worker`` of ``num_workers`` yields on this rank.

        ``__iter__`` calls this with the DataLoader's worker info; tests call it directly to emulate
        workers in one process.
        """
        if num_workers != self.workers or not 0 <= worker < num_workers:
            raise RuntimeError(
                f"the stream was built for {self.workers} worker(s) per rank (data.num_workers="
                f"{self.cfg.num_workers}) but runs as worker {worker} of {num_workers}"
            )
        schema, bsz = self.cfg.schema, self.cfg.batch_size
        if self.train and self.epochs is not None:
            logical = (worker + self.start_step) % num_workers  # resumed stream starts at worker s % W
            for rows in rebatch(self._epoch_parts(logical), bsz, pad_last=False):
                yield rows.to_batch(schema)
            return
        if self.train:
            logical = (worker + self.start_step) % num_workers  # resumed stream starts at worker s % W
            skip_batches = (self.start_step - logical + num_workers - 1) // num_workers
            reader = self.rank * num_workers + logical
            for rows in rebatch(self._train_parts(reader, skip_batches * bsz), bsz, pad_last=False):
                yield rows.to_batch(schema)
            return
        reader = self.rank * num_workers + worker
        target = self.eval_batches_per_reader()
        parts = (self._read_unit(u) for u in self._share(0, reader))
        count = 0
        template: Optional[Rows] = None
        for rows in rebatch(parts, bsz, pad_last=True):
            template = rows
            count += 1
            yield rows.to_batch(schema)
        assert template is not None  # every reader has at least one row (make_units)
        while count < target:
            count += 1
            yield template.padding(bsz).to_batch(schema)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            return self.reader_batches(0, 1)
        return self.reader_batches(info.id, info.num_workers)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files are per process
        return state


def _loader(dataset: ParquetStream, cfg: DataConfig) -> DataLoader:
    # Its own generator: creating an iterator must not draw from the global RNG (dropout's), which would make
    # a resumed run's random stream depend on when its loaders were created.
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, generator=generator)


def train_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    start_step: int = 0,
    sequence_caps: Optional[Mapping[str, int]] = None,
    epochs: Optional[int] = None,
    stream_start: Optional[StreamStart] = None,
) -> Iterable[Batch]:
    """The deterministic training stream of one rank (see the module docstring).

    Every batch has exactly ``cfg.batch_size`` rows. The stream resumed with ``start_step = s`` equals the
    fresh stream with its first ``s`` batches dropped.

    ``epochs=None``: infinite, every row valid. ``epochs=E``: ``E * steps_per_epoch(cfg, world_size)``
    batches; each epoch every training row appears exactly once with ``valid = True`` across all ranks and
    workers, except the :func:`dropped_rows_per_epoch` rows skipped with ``cfg.drop_last``; padding rows
    (``cfg.drop_last=False``, last steps of an epoch only) have ``valid = False`` and ``weights = 0``.

    Args:
        cfg: data config; ``cfg.train_paths`` are read.
        rank: this rank.
        world_size: number of ranks.
        start_step: batches already consumed by this rank (resume); with ``epochs``, at or past the end
            gives an empty stream.
        sequence_caps: sequence group -> keep at most the last this many items of every column of the
            group (e.g. ``{"history": 50}`` for a model that reads 50 behaviours); combined with
            ``cfg.max_sequence_length`` by taking the smaller positive one. Ids are validated over the whole
            stored sequence regardless.
        epochs: None for the infinite stream, ``E >= 1`` for ``E`` exact epochs.
        stream_start: exact epochs: where the stream begins (a run resumed on another world size:
            :func:`datasets.epochs.stream_after`); ``start_step`` counts from there. None: epoch 0, whole.

    Returns:
        A ``DataLoader`` (``batch_size=None``, ``cfg.num_workers`` workers) yielding :class:`Batch`.

    Raises:
        DataError: unreadable file, missing or mistyped column (before anything is yielded); exact
            epochs without a step per epoch; bad values while iterating.
        ValueError: ``sequence_caps`` names a group the schema does not have (the message lists them);
            ``epochs < 1``.
    """
    ds = ParquetStream(
        cfg, cfg.train_paths, rank, world_size, True, start_step=start_step, sequence_caps=sequence_caps, epochs=epochs,
        stream_start=stream_start,
    )
    return _loader(ds, cfg)


def _epoch_layout(cfg: DataConfig, world_size: int) -> EpochLayout:
    if world_size < 1 or cfg.batch_size < 1:
        raise ValueError(f"need world_size >= 1 and data.batch_size >= 1, got {world_size} and {cfg.batch_size}")
    return EpochLayout(count_rows(cfg.train_paths), world_size, max(cfg.num_workers, 1), cfg.batch_size, cfg.drop_last)


def steps_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Batches every rank takes per exact epoch (``train_loader(..., epochs=E)``), from the footers of
    ``cfg.train_paths``: ``ceil(rows / (world_size * batch_size))``, ``floor`` with ``cfg.drop_last``."""
    return _epoch_layout(cfg, world_size).steps


def stream_steps(cfg: DataConfig, world_size: int, epochs: int, start: Optional[StreamStart] = None) -> int:
    """Batches every rank takes in the exact-epoch stream of ``epochs`` epochs beginning at ``start``."""
    layout = _epoch_layout(cfg, world_size)
    return sum(lay.steps for _, lay in stream_layouts(
        layout.rows, world_size, layout.workers, cfg.batch_size, cfg.drop_last, epochs, start))


def dropped_rows_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Training rows an exact epoch does not read: ``rows mod (world_size * batch_size)`` with
    ``cfg.drop_last`` (other rows every epoch when shuffled), else 0."""
    return _epoch_layout(cfg, world_size).dropped_rows


def eval_loader(
    cfg: DataConfig, rank: int, world_size: int, sequence_caps: Optional[Mapping[str, int]] = None
) -> Iterable[Batch]:
    """One finite, unshuffled pass over ``cfg.eval_paths``, this rank's share (see the module docstring).

    Every row appears exactly once across all ranks and workers with ``valid = True``; padding rows have
    ``valid = False`` and ``weights = 0``. Every rank yields the same number of batches.

    Args:
        cfg: data config; ``cfg.eval_paths`` are read.
        rank: this rank.
        world_size: number of ranks.
        sequence_caps: as for :func:`train_loader`.

    Returns:
        A ``DataLoader`` (``batch_size=None``, ``cfg.num_workers`` workers) yielding :class:`Batch`.

    Raises:
        DataError: as for :func:`train_loader`.
        ValueError: ``sequence_caps`` names a group the schema does not have (the message lists them).
    """
    ds = ParquetStream(cfg, cfg.eval_paths, rank, world_size, train=False, sequence_caps=sequence_caps)
    return _loader(ds, cfg)


def eval_batches(cfg: DataConfig, world_size: int, sequence_caps: Optional[Mapping[str, int]] = None) -> int:
    """Batches every rank's :func:`eval_loader` yields (the same on every rank), from the footers of
    ``cfg.eval_paths``. ``sequence_caps`` does not change the count; it is checked as the loader checks it.

    Raises:
        DataError, ValueError: as for :func:`eval_loader`.
    """
    ds = ParquetStream(cfg, cfg.eval_paths, 0, world_size, train=False, sequence_caps=sequence_caps)
    return ds.workers * ds.eval_batches_per_reader()
