"""Pass 2 of the Taobao converter (:mod:`datasets.taobao`): samples of the kept users, negative sampling and
the split writers.

Kept users are processed ``users_per_group`` at a time, each group with its own generator
(``np.random.default_rng([seed, group])``); the protocol (targets, histories, negatives) is described in
:mod:`datasets.taobao`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasets.canonical import BEHAVIOR_TYPES, canonical_arrow_schema, canonical_table

if TYPE_CHECKING:
    from datasets.taobao import TaobaoParams, _Stats
    from datasets.taobao_csv import _Block

class _SplitWriter:
    """Buffers canonical tables and writes row groups of ``row_group_size`` rows into rotating files."""

    def __init__(self, out: Path, row_group_size: int, rows_per_file: int) -> None:
        out.mkdir(parents=True)
        self.out, self.row_group_size, self.rows_per_file = out, row_group_size, rows_per_file
        self.schema = canonical_arrow_schema()
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: Optional[pq.ParquetWriter] = None
        self.file_rows = 0
        self.files = 0
        self.rows = 0
        self.positives = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        self.positives += int(pc.sum(table.column("label")).as_py() or 0)
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
        return {"rows": self.rows, "positives": self.positives, "files": self.files}


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
