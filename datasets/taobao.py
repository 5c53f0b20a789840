"""Converter of Taobao UserBehavior (Tianchi 649) raw CSV to the canonical parquet table, DARE's protocol.

Input: ``UserBehavior.csv``, no header, ``user_id,item_id,category_id,behavior_type,timestamp``
(``behavior_type`` in ``pv|buy|cart|fav``, ``timestamp`` unix seconds), grouped by user.

Protocol (DARE, ``thuml/DARE`` ``preprocess/taobao_v4.py``):

* keep ``pv`` events only;
* remap users, items and categories to ``1..n`` (0 = padding) over all ``pv`` events. Ids are assigned
  in increasing raw-id order (DARE assigns them in order of first appearance; both are bijections);
* keep users with at least ``min_pv`` ``pv`` events (default 210);
* a user's events are ordered by timestamp (stable: ties keep the file order; the public file is already
  time-ordered within a user, so this is DARE's file order);
* targets, counted from the end of the user's sequence: ``train_targets`` (19) training targets at
  positions ``-3, -3 - train_stride, ...`` (``-3, -8, ..., -93``), the validation target ``-2``, the test
  target ``-1``;
* a sample's history is the user's events before the target, the most recent ``max_len`` (200) of them.
  **Histories are stored unpadded** (jagged, oldest first); DARE left-pads to 200 with zeros, which is the
  model's business here;
* every positive gets ``negatives`` (2) negatives with the same history: items sampled in proportion to
  their ``pv`` frequency in the whole file and never among the items of the user's ``pv`` events (DARE's
  rule, which implies "not in the history"); a negative's category is the category of the item's last
  ``pv`` event in the file (DARE's ``iid_2_cid``). Sampling is seeded per group of ``users_per_group``
  kept users (``np.random.default_rng([seed, group])``), so the output does not depend on CSV block size.

Output: ``OUT/{train,valid,test}/part-*.parquet`` in the canonical schema (:mod:`datasets.canonical`):
``user_id, item_id, item_category, hist_item_id, hist_category, hist_behavior_type`` (all 1 = pv, written
for schema uniformity), ``hist_time_delta`` (target timestamp - behaviour timestamp, float32 seconds),
``label``; rows ordered by user (file order), target (deepest first), then positive before its negatives.
``OUT/meta.json`` holds table sizes, counts and the parameters; :func:`taobao_schema` turns it into a
:class:`SchemaConfig`.

The CSV is streamed twice with ``pyarrow.csv.open_csv`` (pass 1: validation, grouping check, id maps,
frequencies, per-user counts; pass 2: samples), so memory is bounded by the id maps, one CSV block and one
group of users. A malformed row raises one :class:`DataError` naming the file, the line, the column and the
expected value.

CLI::

    python -m datasets.taobao --input UserBehavior.csv --out DIR [--min-pv 210] [--max-len 200]
        [--negatives 2] [--seed 0] [--train-targets 19] [--train-stride 5]
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from datasets.canonical import BEHAVIOR_TYPES, canonical_arrow_schema, canonical_schema, canonical_table
from datasets.schema import DataError, SchemaConfig

__all__ = ["TaobaoParams", "convert", "taobao_schema", "main"]

_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
_SPLITS = ("train", "valid", "test")


@dataclass
class TaobaoParams:
    """Parameters of the conversion (see the module docstring).

    Attributes:
        min_pv: keep users with at least this many pv events.
        max_len: keep the most recent this many behaviours before a target.
        negatives: negatives per positive.
        seed: negative-sampling seed.
        train_targets: training targets per user.
        train_stride: distance between consecutive training targets; the first is at ``-3``.
        row_group_size: rows per parquet row group.
        rows_per_file: rows per parquet file (a new ``part-*.parquet`` starts after this many).
        users_per_group: kept users processed (and seeded) together.
        block_size: bytes per CSV block read.
    """

    min_pv: int = 210
    max_len: int = 200
    negatives: int = 2
    seed: int = 0
    train_targets: int = 19
    train_stride: int = 5
    row_group_size: int = 65_536
    rows_per_file: int = 4_194_304
    users_per_group: int = 256
    block_size: int = 1 << 24

    def target_offsets(self) -> dict[str, np.ndarray]:
        """Split -> target positions counted from the end of a user's sequence (1 = the last event).

        Train: ``3, 3 + train_stride, ...`` (``train_targets`` of them, in that order), valid ``2``, test ``1``.
        """
        return {
            "train": 3 + self.train_stride * np.arange(self.train_targets, dtype=np.int64),
            "valid": np.array([2], dtype=np.int64),
            "test": np.array([1], dtype=np.int64),
        }

    def check(self) -> None:
        deepest = 3 + self.train_stride * (self.train_targets - 1) if self.train_targets else 2
        problems = []
        if self.train_targets < 0 or self.train_stride < 1:
            problems.append(f"train_targets >= 0 and train_stride >= 1 (got {self.train_targets}, {self.train_stride})")
        if self.min_pv < deepest + 1:
            problems.append(
                f"min_pv >= {deepest + 1}: the deepest target sits {deepest} events from the end and needs at "
                f"least one history event (got min_pv={self.min_pv}; lower train_targets/train_stride or raise it)"
            )
        if self.max_len < 1 or self.negatives < 0:
            problems.append(f"max_len >= 1 and negatives >= 0 (got {self.max_len}, {self.negatives})")
        if self.row_group_size < 1 or self.rows_per_file < 1 or self.users_per_group < 1 or self.block_size < 1:
            problems.append("positive row_group_size, rows_per_file, users_per_group and block_size")
        if problems:
            raise ValueError("invalid TaobaoParams: need " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ CSV


@dataclass
class _Block:
    """Validated rows of one CSV block. Shapes: R rows of the block."""

    first_line: int  # 1-based line number of the block's first row
    users: np.ndarray  # [R] int64 raw ids
    items: np.ndarray  # [R] int64
    cats: np.ndarray  # [R] int64
    pv: np.ndarray  # [R] bool
    ts: np.ndarray  # [R] int64


def _locate_bad_line(path: str) -> tuple[int, int, str]:
    """(line number, field count, text) of the first line without 5 fields (error path only; streams)."""
    with open(path, newline="") as fh:
        for number, fields in enumerate(csv.reader(fh), start=1):
            if len(fields) != len(_COLUMNS):
                return number, len(fields), ",".join(fields)
    return -1, -1, ""


def _blocks(path: str, block_size: int) -> Iterator[_Block]:
    """Streams the CSV block by block, validating every value.

    Raises:
        DataError: unreadable file, or the first malformed row (line, column, expected value).
    """
    invalid: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"

    def raise_invalid() -> None:
        number, count, text = _locate_bad_line(path)
        raise DataError(
            f"{path}: line {number}: {count} fields ({text!r}); expected {len(_COLUMNS)} columns "
            f"{','.join(_COLUMNS)}"
        )

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=_COLUMNS, block_size=block_size),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in _COLUMNS}),
        )
    except (OSError, pa.ArrowException) as e:
        if invalid:
            raise_invalid()
        raise DataError(f"{path}: cannot read as CSV: {e}") from None
    line = 1
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as e:
            raise DataError(f"{path}: CSV error after line {line - 1}: {e}") from None
        if invalid:
            raise_invalid()

        def check(column: str, ok: pa.Array, expected: str) -> None:
            good = ok.to_numpy(zero_copy_only=False)
            if not good.all():
                i = int(np.argmin(good))
                value = batch.column(column)[i].as_py()
                raise DataError(f"{path}: line {line + i}, column {column!r}: value {value!r}; expected {expected}")

        for column in ("user_id", "item_id", "category_id"):
            check(column, pc.match_substring_regex(batch.column(column), r"^[0-9]{1,18}$"), "a non-negative integer id")
        check("timestamp", pc.match_substring_regex(batch.column("timestamp"), r"^-?[0-9]{1,18}$"), "an integer unix timestamp (seconds)")
        btype = batch.column("behavior_type")
        check("behavior_type", pc.is_in(btype, value_set=pa.array(list(BEHAVIOR_TYPES))), f"one of {'|'.join(BEHAVIOR_TYPES)}")

        def ints(column: str) -> np.ndarray:
            return pc.cast(batch.column(column), pa.int64()).to_numpy()

        yield _Block(
            first_line=line,
            users=ints("user_id"),
            items=ints("item_id"),
            cats=ints("category_id"),
            pv=pc.equal(btype, "pv").to_numpy(zero_copy_only=False),
            ts=ints("timestamp"),
        )
        line += batch.num_rows


# --------------------------------------------------------------------------------------------- pass 1


@dataclass
class _Stats:
    """Pass 1 results; sorted raw ids define the remapping (raw ``ids[k]`` -> ``k + 1``)."""

    users: np.ndarray  # [U] sorted raw ids of users with pv events
    user_pv: np.ndarray  # [U + 1] pv events per new user id (0 at padding)
    items: np.ndarray  # [I] sorted raw item ids
    item_count: np.ndarray  # [I + 1] pv events per new item id
    item_cat: np.ndarray  # [I + 1] new category id of the item's last pv event
    cats: np.ndarray  # [C] sorted raw category ids
    csv_rows: int
    pv_rows: int
    csv_users: int


def _merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduces (key, count) pairs: sorted unique keys ``[K]``, summed counts ``[K]``."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def _merge_last(keys: np.ndarray, counts: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduces (key, count, value) triples given in order: counts summed, the last occurrence's value kept."""
    uniq, total = _merge_counts(keys, counts)
    _, rev_first = np.unique(keys[::-1], return_index=True)  # same sorted keys as uniq
    return uniq, total, last[::-1][rev_first]


def _pass1(path: str, block_size: int) -> _Stats:
    done_users = np.empty(0, dtype=np.int64)  # users whose run has ended, sorted
    current = -1  # user of the run still open at the end of the previous block (-1: none; ids are >= 0)
    pv_users = (np.empty(0, np.int64), np.empty(0, np.int64))
    pv_items = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))
    cats = np.empty(0, dtype=np.int64)
    csv_rows = pv_rows = 0
    for b in _blocks(path, block_size):
        if not len(b.users):
            continue
        csv_rows += len(b.users)
        # grouping check: each user's rows form one contiguous run
        starts = np.flatnonzero(np.concatenate([[b.users[0] != current], b.users[1:] != b.users[:-1]]))
        run_users = b.users[starts]  # users whose run starts in this block
        _, first, inverse = np.unique(run_users, return_index=True, return_inverse=True)
        repeated = (first[inverse] != np.arange(len(run_users))) | np.isin(run_users, done_users)
        repeated |= run_users == current
        if repeated.any():
            k = int(np.argmax(repeated))
            raise DataError(
                f"{path}: line {b.first_line + int(starts[k])}, column 'user_id': user {int(run_users[k])} appears "
                f"again after other users' rows; expected the file grouped by user (each user's rows contiguous)"
            )
        runs = run_users if len(starts) and starts[0] == 0 else np.concatenate([[current], run_users])
        done_users = np.union1d(done_users, runs[:-1])
        current = int(runs[-1])

        pv = b.pv
        pv_rows += int(pv.sum())
        u, c = np.unique(b.users[pv], return_counts=True)
        pv_users = _merge_counts(np.concatenate([pv_users[0], u]), np.concatenate([pv_users[1], c]))
        it, ct = b.items[pv], b.cats[pv]
        pv_items = _merge_last(
            np.concatenate([pv_items[0], it]),
            np.concatenate([pv_items[1], np.ones(len(it), np.int64)]),
            np.concatenate([pv_items[2], ct]),
        )
        cats = np.union1d(cats, ct)
    if pv_rows == 0:
        raise DataError(f"{path}: no 'pv' rows; expected Taobao UserBehavior rows with behavior_type pv")
    csv_users = len(done_users) + (current >= 0)
    item_cat_raw = pv_items[2]
    return _Stats(
        users=pv_users[0],
        user_pv=np.concatenate([[0], pv_users[1]]),
        items=pv_items[0],
        item_count=np.concatenate([[0], pv_items[1]]),
        item_cat=np.concatenate([[0], np.searchsorted(cats, item_cat_raw) + 1]),
        cats=cats,
        csv_rows=csv_rows,
        pv_rows=pv_rows,
        csv_users=int(csv_users),
    )


# --------------------------------------------------------------------------------------------- pass 2


class _SplitWriter:
    """Buffers canonical tables and writes row groups of ``row_group_size`` rows into rotating files."""

    def __init__(self, out: Path, row_group_size: int, rows_per_file: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("part-*.parquet"):
            stale.unlink()
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
    raise RuntimeError(f"could not sample negatives outside the history of {len(todo)} users after 1000 rounds")


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
        users, items, cats, ts: ``[E]`` the group's pv events (new ids), users contiguous in file order.
    """
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))  # [m] each user's first event
    m = len(starts)
    local = np.repeat(np.arange(m), np.diff(np.append(starts, len(users))))  # [E] user index in the group
    # by user (file order), then timestamp; lexsort is stable, so ties keep the file order and every
    # user's run stays where it was
    order = np.lexsort((ts, local))
    users, items, cats, ts = users[order], items[order], cats[order], ts[order]
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


def convert(input_csv: str | Path, out_dir: str | Path, params: Optional[TaobaoParams] = None) -> dict:
    """Converts a Taobao UserBehavior CSV to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    Args:
        input_csv: the raw CSV (no header, grouped by user).
        out_dir: output directory (created; old ``part-*.parquet`` in the split folders are removed).
        params: protocol parameters (default: DARE's).

    Returns:
        The meta written to ``meta.json``: ``params``, ``num_ids`` (real ids per table), ``table_sizes``,
        ``counts`` (CSV rows, pv rows, users, kept users, items, categories) and ``splits`` (rows,
        positives, files per split).

    Raises:
        DataError: unreadable CSV or malformed row (file, line, column, expected value); file not
            grouped by user.
    """
    p = params or TaobaoParams()
    p.check()
    path = str(input_csv)
    out = Path(out_dir)
    stats = _pass1(path, p.block_size)
    item_cdf = np.cumsum(stats.item_count[1:])
    writers = {s: _SplitWriter(out / s, p.row_group_size, p.rows_per_file) for s in _SPLITS}

    # pass 2: pv events of kept users, grouped by users_per_group kept users
    pending: list[tuple[np.ndarray, ...]] = []  # complete kept users' events, in file order
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

    for b in _blocks(path, p.block_size):
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

    splits = {s: w.close() for s, w in writers.items()}
    meta = {
        "source": path,
        "protocol": "DARE (thuml/DARE preprocess/taobao_v4.py); histories unpadded, oldest first",
        "params": asdict(p),
        "num_ids": {"user_id": len(stats.users), "item_id": len(stats.items), "item_category": len(stats.cats)},
        "table_sizes": canonical_schema(len(stats.users), len(stats.items), len(stats.cats)).table_sizes(),
        "counts": {
            "csv_rows": stats.csv_rows,
            "pv_rows": stats.pv_rows,
            "csv_users": stats.csv_users,
            "pv_users": len(stats.users),
            "kept_users": kept_users,
            "items": len(stats.items),
            "categories": len(stats.cats),
        },
        "splits": splits,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def taobao_schema(meta: dict) -> SchemaConfig:
    """The :class:`SchemaConfig` of a converted data set, from its ``meta.json`` dict."""
    n = meta["num_ids"]
    return canonical_schema(n["user_id"], n["item_id"], n["item_category"])


def main(argv: Optional[list[str]] = None) -> dict:
    """CLI entry point; see the module docstring."""
    d = TaobaoParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.taobao", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="UserBehavior.csv")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--min-pv", type=int, default=d.min_pv)
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--negatives", type=int, default=d.negatives)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--train-targets", type=int, default=d.train_targets)
    ap.add_argument("--train-stride", type=int, default=d.train_stride)
    a = ap.parse_args(argv)
    params = TaobaoParams(
        min_pv=a.min_pv,
        max_len=a.max_len,
        negatives=a.negatives,
        seed=a.seed,
        train_targets=a.train_targets,
        train_stride=a.train_stride,
    )
    meta = convert(a.input, a.out, params)
    print(json.dumps({"out": a.out, "counts": meta["counts"], "splits": meta["splits"]}, indent=2))
    return meta


if __name__ == "__main__":
    main()
