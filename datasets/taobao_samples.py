"""Pass 2 of the Taobao converter (:mod:`datasets.taobao`): samples of the kept users, negative sampling and
the split writers; and the labelled-events pipeline of :mod:`datasets.kuairand` and :mod:`datasets.movielens`
(every row a sample, history = the user's earlier behaviours, no negative sampling).

Kept users are processed ``users_per_group`` at a time, each group with its own generator
(``np.random.default_rng([seed, group])``); the protocol (targets, histories, negatives) is described in
:mod:`datasets.taobao`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets.canonical import BEHAVIOR_TYPES, canonical_arrow_schema, canonical_table
from datasets.schema import DataError
from datasets.taobao_csv import _merged_blocks, _sort_runs

if TYPE_CHECKING:
    from datasets.taobao import TaobaoParams, _Stats
    from datasets.taobao_csv import _Block

class _SplitWriter:
    """Buffers tables (canonical ones unless ``schema`` is given) and writes row groups of ``row_group_size`` rows
    into rotating files. Subclasses count other statistics by overriding ``_count`` and ``_summary``."""

    def __init__(self, out: Path, row_group_size: int, rows_per_file: int, schema: Optional[pa.Schema] = None) -> None:
        out.mkdir(parents=True)
        self.out, self.row_group_size, self.rows_per_file = out, row_group_size, rows_per_file
        self.schema = schema if schema is not None else canonical_arrow_schema()
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: Optional[pq.ParquetWriter] = None
        self.file_rows = 0
        self.files = 0
        self.rows = 0
        self.positives = 0

    def _count(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.positives += int(pc.sum(table.column("label")).as_py() or 0)

    def _summary(self) -> dict:
        return {"rows": self.rows, "positives": self.positives, "files": self.files}

    def add(self, table: pa.Table) -> None:
        self._count(table)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self._next_group_rows():
            self._flush(self._next_group_rows())

    def _next_group_rows(self) -> int:
        return min(self.row_group_size, self.rows_per_file - self.file_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.out / f"part-{self.files:05d}.parquet", self.schema)
            self.files += 1
        self.writer.write_table(table.slice(0, n), row_group_size=n)
        self.file_rows += n
        rest = table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self.file_rows >= self.rows_per_file:
            self.writer.close()
            self.writer, self.file_rows = None, 0

    def close(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        if self.writer is not None:
            self.writer.close()
        if self.files == 0:  # an empty split still gets one (empty) file so readers see the schema
            pq.write_table(self.schema.empty_table(), self.out / "part-00000.parquet")
            self.files = 1
        return self._summary()


class _NoNegatives(Exception):
    """Negative sampling gave up: some users have viewed (nearly) every item."""

    def __init__(self, users: int) -> None:
        super().__init__(users)
        self.users = users


def _sample_negatives(
    rng: np.random.Generator,
    owners: np.ndarray,
    user_items: np.ndarray,
    item_cdf: np.ndarray,
    num_items: int,
) -> np.ndarray:
    """One negative per entry of ``owners`` (local user index), ∝ frequency, not in that user's pv items.

    Args:
        owners: ``[M]`` local user index of each negative.
        user_items: sorted unique keys ``local_user * (num_items + 1) + item`` of the group's pv events.
        item_cdf: ``[I]`` cumulative pv counts of items ``1..I``.
    """
    out = np.zeros(len(owners), dtype=np.int64)
    todo = np.arange(len(owners))
    for _ in range(1000):
        if not len(todo):
            return out
        cand = np.searchsorted(item_cdf, rng.integers(0, item_cdf[-1], len(todo)), side="right") + 1
        keys = owners[todo] * (num_items + 1) + cand
        at = np.minimum(np.searchsorted(user_items, keys), len(user_items) - 1)
        seen = user_items[at] == keys
        out[todo[~seen]] = cand[~seen]
        todo = todo[seen]
    raise _NoNegatives(len(np.unique(owners[todo])))


def _group_samples(
    users: np.ndarray,
    items: np.ndarray,
    cats: np.ndarray,
    ts: np.ndarray,
    stats: _Stats,
    p: TaobaoParams,
    rng: np.random.Generator,
    item_cdf: np.ndarray,
) -> dict[str, pa.Table]:
    """Samples of a group of kept users, per split.

    Args:
        users, items, cats, ts: ``[E]`` the group's pv events (new ids) in (user, timestamp) order, ties
            in file order.
    """
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))  # [m] each user's first event
    m = len(starts)
    local = np.repeat(np.arange(m), np.diff(np.append(starts, len(users))))  # [E] user index in the group
    user_start = starts
    user_end = np.append(starts[1:], len(users))
    user_ids = users[user_start]
    num_items = len(stats.items)
    user_items = np.unique(local * (num_items + 1) + items)
    k = p.negatives
    out: dict[str, pa.Table] = {}
    for split, offsets in p.target_offsets().items():
        n_t = len(offsets)
        tgt = (user_end[:, None] - offsets[None, :]).reshape(-1)  # [m * n_t] event index of each target
        owner = np.repeat(np.arange(m), n_t)  # [m * n_t]
        h_start = np.maximum(user_start[owner], tgt - p.max_len)
        h_len = tgt - h_start
        neg = _sample_negatives(rng, np.repeat(owner, k), user_items, item_cdf, num_items).reshape(-1, k)
        row_item = np.concatenate([items[tgt][:, None], neg], axis=1).reshape(-1)  # [m * n_t * (1 + k)]
        row_cat = np.concatenate([cats[tgt][:, None], stats.item_cat[neg]], axis=1).reshape(-1)
        label = np.tile(np.concatenate([[1.0], np.zeros(k)]), len(tgt)).astype(np.float32)
        r_start, r_len, r_ts = (np.repeat(x, 1 + k) for x in (h_start, h_len, ts[tgt]))
        r_off = np.zeros(len(r_len) + 1, dtype=np.int64)
        np.cumsum(r_len, out=r_off[1:])
        pos = np.arange(r_off[-1], dtype=np.int64) + np.repeat(r_start - r_off[:-1], r_len)  # history events
        out[split] = canonical_table(
            user_id=np.repeat(user_ids[owner], 1 + k),
            item_id=row_item,
            item_category=row_cat,
            hist_lengths=r_len,
            hist_item_id=items[pos],
            hist_category=cats[pos],
            hist_behavior_type=np.full(len(pos), BEHAVIOR_TYPES["pv"], dtype=np.int64),
            hist_time_delta=(np.repeat(r_ts, r_len) - ts[pos]).astype(np.float32),
            label=label,
        )
    return out


def _pass2(blocks: Iterable[_Block], stats: _Stats, p: TaobaoParams, writers: dict[str, _SplitWriter]) -> int:
    """Writes the samples of the kept users, ``users_per_group`` at a time; returns the kept users.

    Args:
        blocks: the rows in (user, timestamp) order, ties in file order.
    """
    item_cdf = np.cumsum(stats.item_count[1:])
    pending: list[tuple[np.ndarray, ...]] = []  # complete kept users' events, in order
    pending_users = 0
    carry = (np.empty(0, np.int64),) * 4  # events of the user still open at the end of the last block
    group = 0
    kept_users = 0

    def flush(n_users: int) -> None:
        nonlocal pending, pending_users, group
        events = [np.concatenate(cols) for cols in zip(*pending)]
        starts = np.flatnonzero(np.concatenate([[True], events[0][1:] != events[0][:-1]]))
        cut = len(events[0]) if n_users >= len(starts) else int(starts[n_users])
        now, rest = [e[:cut] for e in events], [e[cut:] for e in events]
        tables = _group_samples(*now, stats, p, np.random.default_rng([p.seed, group]), item_cdf)
        for split, table in tables.items():
            writers[split].add(table)
        group += 1
        pending = [tuple(rest)] if len(rest[0]) else []
        pending_users -= min(n_users, len(starts))

    def add_complete(users: np.ndarray, items: np.ndarray, cats: np.ndarray, ts: np.ndarray) -> None:
        nonlocal pending_users, kept_users
        keep = stats.user_pv[users] >= p.min_pv
        if not keep.any():
            return
        users, items, cats, ts = users[keep], items[keep], cats[keep], ts[keep]
        n_new = int(np.count_nonzero(np.concatenate([[True], users[1:] != users[:-1]])))
        kept_users += n_new
        pending.append((users, items, cats, ts))
        pending_users += n_new
        while pending_users >= p.users_per_group:
            flush(p.users_per_group)

    for b in blocks:
        pv = b.pv
        users = np.searchsorted(stats.users, b.users[pv]) + 1
        items = np.searchsorted(stats.items, b.items[pv]) + 1
        cats = np.searchsorted(stats.cats, b.cats[pv]) + 1
        ev = [np.concatenate([c, x]) for c, x in zip(carry, (users, items, cats, b.ts[pv]))]
        if not len(ev[0]):
            continue
        last_start = int(np.flatnonzero(np.concatenate([[True], ev[0][1:] != ev[0][:-1]]))[-1])
        add_complete(*(e[:last_start] for e in ev))
        carry = tuple(e[last_start:] for e in ev)
    add_complete(*carry)
    if pending_users:
        flush(pending_users)
    return kept_users


# --------------------------------------------------------------------- labelled events (every row a sample)
# KuaiRand and MovieLens logs label every row (click or not): each row becomes one sample, whose history is
# the user's earlier behaviours; no negatives are sampled. Used by datasets.kuairand and datasets.movielens.


@dataclass
class EventParams:
    """Parameters of the labelled-events pipeline (every row is a sample).

    Attributes:
        max_len: keep the most recent this many behaviours before a target.
        row_group_size: rows per parquet row group.
        rows_per_file: rows per parquet file.
        events_per_group: rows processed together (whole users; bounds memory to about ``max_len`` times it).
        block_size: bytes per CSV block read.
        sort_rows: rows per sorted run when the input is not in (user, time) order (about 40 bytes each).
    """

    max_len: int = 200
    row_group_size: int = 65_536
    rows_per_file: int = 4_194_304
    events_per_group: int = 65_536
    block_size: int = 1 << 24
    sort_rows: int = 1 << 22

    def check(self) -> None:
        sizes = {k: getattr(self, k) for k in ("max_len", "row_group_size", "rows_per_file", "events_per_group",
                                               "block_size", "sort_rows")}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"invalid {type(self).__name__}: need positive {', '.join(bad)} (got {bad})")


@dataclass
class _Events:
    """Validated rows (raw ids); the sort keys are ``users`` and ``ts``. Shapes: R rows."""

    users: np.ndarray  # [R] int64 raw user ids
    ts: np.ndarray  # [R] int64 time (the caller's unit)
    items: np.ndarray  # [R] int64 raw item ids
    label: np.ndarray  # [R] int8 0/1
    btype: np.ndarray  # [R] int64 behaviour type in later histories; 0: never in a history
    split: np.ndarray  # [R] int8 index into the splits; -1: by position (last test, second-last valid, rest train)


@dataclass
class _EventStats:
    users: np.ndarray  # [U] sorted raw user ids
    items: np.ndarray  # [I] sorted raw item ids
    rows: int
    positives: int


def _event_stats(blocks: Iterable[_Events]) -> Optional[_EventStats]:
    """Id sets and counts of rows in (user, time) order; None as soon as a row breaks that order."""
    prev_user, prev_ts = np.iinfo(np.int64).min, 0
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    rows = positives = 0
    for b in blocks:
        if not len(b.users):
            continue
        u, t = np.concatenate([[prev_user], b.users]), np.concatenate([[prev_ts], b.ts])
        if not ((u[1:] > u[:-1]) | ((u[1:] == u[:-1]) & (t[1:] >= t[:-1]))).all():
            return None
        prev_user, prev_ts = int(b.users[-1]), int(b.ts[-1])
        rows += len(b.users)
        positives += int(np.count_nonzero(b.label))
        users.append(np.unique(b.users))
        items.append(np.unique(b.items))
        if len(users) >= 64:  # bound the pending id arrays
            users, items = [np.unique(np.concatenate(users))], [np.unique(np.concatenate(items))]
    cat = lambda xs: np.unique(np.concatenate(xs)) if xs else np.empty(0, np.int64)  # noqa: E731
    return _EventStats(users=cat(users), items=cat(items), rows=rows, positives=positives)


def _event_tables(ev: list[np.ndarray], item_cat: np.ndarray, p: EventParams, n_splits: int,
                  time_scale: float) -> list[pa.Table]:
    """Samples (one per event) of a group of complete users, per split.

    Args:
        ev: ``users, ts, items, label, btype, split`` ``[E]`` (new user and item ids) in (user, time) order.
        item_cat: ``[I + 1]`` new category id per new item id.
        time_scale: seconds per unit of ``ts``.
    """
    users, ts, items, label, btype, split = ev
    n = len(users)
    idx = np.arange(n)
    new_user = np.concatenate([[True], users[1:] != users[:-1]])
    user_first = np.maximum.accumulate(np.where(new_user, idx, 0))  # [E] index of the user's first event
    new_tie = new_user | np.concatenate([[True], ts[1:] != ts[:-1]])
    tie_first = np.maximum.accumulate(np.where(new_tie, idx, 0))  # [E] first event of the same (user, time)
    user_last = np.flip(np.minimum.accumulate(np.flip(np.where(np.append(new_user[1:], True), idx, n))))
    in_hist = btype > 0
    before = np.concatenate([[0], np.cumsum(in_hist)])  # [E + 1] history behaviours before each index
    h_idx = np.flatnonzero(in_hist)  # [H] the behaviours, in order
    hi = before[tie_first]  # a behaviour at the target's own time is not in its history
    lo = np.maximum(before[user_first], hi - p.max_len)
    from_end = user_last - idx + 1  # 1: the user's last event
    split = np.where(split >= 0, split, np.where(from_end == 1, 2, np.where(from_end == 2, 1, 0)))
    out = []
    for s in range(n_splits):
        rows = np.flatnonzero(split == s)
        r_lo, r_len = lo[rows], hi[rows] - lo[rows]
        r_off = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(r_len, out=r_off[1:])
        pos = h_idx[np.arange(r_off[-1], dtype=np.int64) + np.repeat(r_lo - r_off[:-1], r_len)]  # [sum len]
        out.append(canonical_table(
            user_id=users[rows],
            item_id=items[rows],
            item_category=item_cat[items[rows]],
            hist_lengths=r_len,
            hist_item_id=items[pos],
            hist_category=item_cat[items[pos]],
            hist_behavior_type=btype[pos],
            hist_time_delta=((np.repeat(ts[rows], r_len) - ts[pos]) * time_scale).astype(np.float32),
            label=label[rows].astype(np.float32),
        ))
    return out


def _event_pass2(blocks: Iterable[_Events], stats: _EventStats, item_cat: np.ndarray, p: EventParams,
                 writers: list[_SplitWriter], time_scale: float) -> None:
    """Writes one sample per row, ``events_per_group`` rows (whole users) at a time, into ``writers``."""
    pending: list[list[np.ndarray]] = []
    pending_rows = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        ev = [np.concatenate(c) for c in zip(*pending)]
        starts = np.flatnonzero(np.concatenate([[True], ev[0][1:] != ev[0][:-1]]))
        if not final and len(starts) == 1:
            return  # one user so far, maybe still open: wait for the next user
        cut = len(ev[0]) if final else int(starts[-1])  # keep the last (possibly open) user for later
        for w, table in zip(writers, _event_tables([e[:cut] for e in ev], item_cat, p, len(writers), time_scale)):
            w.add(table)
        pending = [[e[cut:] for e in ev]] if cut < len(ev[0]) else []
        pending_rows = len(ev[0]) - cut

    for b in blocks:
        if not len(b.users):
            continue
        users = np.searchsorted(stats.users, b.users) + 1
        items = np.searchsorted(stats.items, b.items) + 1
        pending.append([users, b.ts, items, b.label, b.btype, b.split])
        pending_rows += len(users)
        if pending_rows >= p.events_per_group:
            flush(False)
    if pending_rows:
        flush(True)


def _event_samples(
    read: Callable[[], Iterator[_Events]],
    tmp: Path,
    p: EventParams,
    split_names: list[str],
    categorize: Callable[[np.ndarray], np.ndarray],
    time_scale: float,
    no_rows: str,
) -> tuple[_EventStats, np.ndarray, dict, bool]:
    """Pass 1 (after an out-of-core sort when the rows are not in (user, time) order) and pass 2 into
    ``tmp/<split>``.

    Args:
        read: streams the validated rows, in input order (a new stream per call).
        categorize: ``[I]`` sorted raw item ids -> ``[I]`` raw category keys (any sortable integers).
        no_rows: the error message when there is no row at all.

    Returns:
        ``(stats, [C] sorted raw category keys (new id k + 1 = cats[k]), {split: rows, positives, files},
        whether the input was already in order)``.
    """
    stats = _event_stats(read())
    runs: list[Path] = []
    if stats is None:  # not in (user, time) order: sort, then read the sorted rows
        runs = _sort_runs(read(), p.sort_rows, tmp / ".sort")
        stats = _event_stats(_merged_blocks(runs, _Events))
        assert stats is not None, "the merged runs are sorted"
    if stats.rows == 0:
        raise DataError(no_rows)
    cats, inverse = np.unique(categorize(stats.items), return_inverse=True)
    item_cat = np.concatenate([[0], inverse.reshape(-1) + 1]).astype(np.int64)  # [I + 1]
    writers = [_SplitWriter(tmp / s, p.row_group_size, p.rows_per_file) for s in split_names]
    _event_pass2(_merged_blocks(runs, _Events) if runs else read(), stats, item_cat, p, writers, time_scale)
    splits = {s: w.close() for s, w in zip(split_names, writers)}
    if runs:
        shutil.rmtree(tmp / ".sort")
    return stats, cats, splits, not runs
