"""Converter of Taobao UserBehavior (Tianchi 649) raw CSV to the canonical parquet table, DARE's protocol.

Input: ``UserBehavior.csv``, no header, ``user_id,item_id,category_id,behavior_type,timestamp``
(``behavior_type`` in ``pv|buy|cart|fav``, ``timestamp`` unix seconds), in any row order: the full file
grouped by user, or a slice ordered by time.

Row order. The converter works on the rows sorted by ``(user_id, timestamp)``, stably: a user's rows with
equal timestamps keep their order in the file (that is what "file order" means below). A file already in
that order (grouped by user, users in increasing id order, each user's rows time-ordered) is read as it is;
any other file (a time-ordered slice, or a file grouped in another user order) is first sorted out of core
into a temporary Arrow data set in the output's temporary folder (sorted runs of ``sort_rows`` rows, then a
k-way merge: :mod:`datasets.taobao_csv`), with memory bounded by ``sort_rows``. The output therefore depends
on the rows only, never on how the file lays them out (apart from the order of one user's rows with equal
timestamps).

Protocol (DARE, ``thuml/DARE`` ``preprocess/taobao_v4.py``):

* keep ``pv`` events only;
* remap users, items and categories to ``1..n`` (0 = padding) over all ``pv`` events. Ids are assigned
  in increasing raw-id order (DARE assigns them in order of first appearance; both are bijections);
* keep users with at least ``min_pv`` ``pv`` events (default 210);
* a user's events are ordered by timestamp, ties in file order (the public file is time-ordered within a
  user, so this is DARE's order);
* targets, counted from the end of the user's sequence: ``train_targets`` (19) training targets at
  positions ``-3, -3 - train_stride, ...`` (``-3, -8, ..., -93``), the validation target ``-2``, the test
  target ``-1``;
* a sample's history is the user's events before the target, the most recent ``max_len`` (200) of them.
  **Histories are stored unpadded** (jagged, oldest first); DARE left-pads to 200 with zeros, which is the
  model's business here;
* every positive gets ``negatives`` (2) negatives with the same history: items sampled in proportion to
  their ``pv`` frequency in the whole file and never among the items of the user's ``pv`` events (DARE's
  rule, which implies "not in the history"); a negative's category is the category of the item's last
  ``pv`` event in the sorted order above (DARE's ``iid_2_cid`` takes the last in its file, which is the
  same event when the file is grouped by user in increasing id order). Sampling is seeded per group of
  ``users_per_group`` kept users (``np.random.default_rng([seed, group])``), so the output does not depend
  on CSV block size.

Output: ``OUT/{train,valid,test}/part-*.parquet`` in the canonical schema (:mod:`datasets.canonical`):
``user_id, item_id, item_category, hist_item_id, hist_category, hist_behavior_type`` (all 1 = pv, written
for schema uniformity), ``hist_time_delta`` (target timestamp - behaviour timestamp, float32 seconds),
``label``; rows ordered by user id, target (deepest first), then positive before its negatives.
``OUT/meta.json`` holds table sizes, counts and the parameters; :func:`taobao_schema` turns it into a
:class:`SchemaConfig`, and ``data.meta_path`` points a training config at it. ``OUT`` is written as a
whole into a temporary folder beside it and swapped in at the end (:mod:`datasets.convert_io`): a failed
or killed conversion leaves a previous ``OUT`` complete.

The CSV is streamed with ``pyarrow.csv.open_csv`` and validated block by block (:mod:`datasets.taobao_csv`)
in two passes (pass 1, here: order check, id maps, frequencies, per-user counts; pass 2, in
:mod:`datasets.taobao_samples`: samples), so memory is bounded by the id maps, one CSV block and one group
of users (and ``sort_rows`` rows while sorting). Bad input raises one :class:`DataError` naming the file
and, for a malformed row, the line, the column and the expected value; so does a ``min_pv`` that no user
meets.

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or an ``--out`` that is not a previous output;
3 bad input; errors are one line on stderr)::

    python -m datasets.taobao --input UserBehavior.csv --out DIR [--min-pv 210] [--max-len 200]
        [--negatives 2] [--seed 0] [--train-targets 19] [--train-stride 5] [--row-group-size 65536]
        [--rows-per-file 4194304]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from datasets.canonical import canonical_schema, canonical_schema_from_meta
from datasets.convert_io import run_converter, staged_output
from datasets.schema import DataError
from datasets.taobao_csv import _Block, _blocks, _merged_blocks, _sort_runs
from datasets.taobao_samples import _NoNegatives, _SplitWriter, _pass2

__all__ = ["TaobaoParams", "convert", "taobao_schema", "main"]

_SPLITS = ("train", "valid", "test")
#: What an output folder holds (anything else makes :func:`convert` refuse to replace it).
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in _SPLITS}}


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
        sort_rows: rows per sorted run when the file is not in ``(user_id, timestamp)`` order (about 40
            bytes each are held in memory while a run is sorted).
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
    sort_rows: int = 1 << 22

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
        sizes = (self.row_group_size, self.rows_per_file, self.users_per_group, self.block_size, self.sort_rows)
        if min(sizes) < 1:
            problems.append(
                "positive row_group_size, rows_per_file, users_per_group, block_size and sort_rows "
                f"(got {', '.join(map(str, sizes))})"
            )
        if problems:
            raise ValueError("invalid TaobaoParams: need " + "; ".join(problems))


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


_NO_PV = "no 'pv' rows; expected Taobao UserBehavior rows with behavior_type pv"


def _merge_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduces (key, count) pairs: sorted unique keys ``[K]``, summed counts ``[K]``."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def _merge_last(keys: np.ndarray, counts: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduces (key, count, value) triples given in order: counts summed, the last occurrence's value kept."""
    uniq, total = _merge_counts(keys, counts)
    _, rev_first = np.unique(keys[::-1], return_index=True)  # same sorted keys as uniq
    return uniq, total, last[::-1][rev_first]


def _pass1(blocks: Iterable[_Block], path: str, no_events: str = _NO_PV) -> Optional[_Stats]:
    """Statistics of rows in (user, timestamp) order; None as soon as a row breaks that order.

    Raises:
        DataError: no pv rows (``no_events`` says what was expected).
    """
    prev_user, prev_ts = -1, 0  # raw ids are >= 0, so the first row always follows
    pv_users = (np.empty(0, np.int64), np.empty(0, np.int64))
    pv_items = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))
    cats = np.empty(0, dtype=np.int64)
    csv_rows = pv_rows = csv_users = 0
    for b in blocks:
        if not len(b.users):
            continue
        u = np.concatenate([[prev_user], b.users])
        t = np.concatenate([[prev_ts], b.ts])
        new_user = u[1:] != u[:-1]
        if not ((u[1:] > u[:-1]) | (~new_user & (t[1:] >= t[:-1]))).all():
            return None
        csv_users += int(np.count_nonzero(new_user))
        prev_user, prev_ts = int(b.users[-1]), int(b.ts[-1])
        csv_rows += len(b.users)

        pv = b.pv
        pv_rows += int(pv.sum())
        uu, c = np.unique(b.users[pv], return_counts=True)
        pv_users = _merge_counts(np.concatenate([pv_users[0], uu]), np.concatenate([pv_users[1], c]))
        it, ct = b.items[pv], b.cats[pv]
        pv_items = _merge_last(
            np.concatenate([pv_items[0], it]),
            np.concatenate([pv_items[1], np.ones(len(it), np.int64)]),
            np.concatenate([pv_items[2], ct]),
        )
        cats = np.union1d(cats, ct)
    if pv_rows == 0:
        raise DataError(f"{path}: {no_events}")
    return _Stats(
        users=pv_users[0],
        user_pv=np.concatenate([[0], pv_users[1]]),
        items=pv_items[0],
        item_count=np.concatenate([[0], pv_items[1]]),
        item_cat=np.concatenate([[0], np.searchsorted(cats, pv_items[2]) + 1]),
        cats=cats,
        csv_rows=csv_rows,
        pv_rows=pv_rows,
        csv_users=csv_users,
    )


def _samples(
    read: Callable[[], Iterator[_Block]], path: str, p: TaobaoParams, tmp: Path, event: str = "pv",
    no_events: str = _NO_PV,
) -> tuple[_Stats, int, dict, bool]:
    """Pass 1 (after an out-of-core sort when the rows are not in (user, timestamp) order) and pass 2 into
    ``tmp/{train,valid,test}``; ``read()`` streams the validated rows (``pv`` = the events kept), ``event``
    names them in messages.

    Returns:
        ``(stats, kept users, {split: rows, positives, files}, whether the input was already sorted)``.
    """
    stats = _pass1(read(), path, no_events)
    runs: list[Path] = []
    if stats is None:  # not in (user, timestamp) order: sort, then read the sorted rows
        runs = _sort_runs(read(), p.sort_rows, tmp / ".sort")
        stats = _pass1(_merged_blocks(runs), path, no_events)
        assert stats is not None, "the merged runs are sorted"
    kept = int(np.count_nonzero(stats.user_pv >= p.min_pv))
    if kept == 0:
        raise DataError(
            f"{path}: no user has min_pv={p.min_pv} {event} events: all {len(stats.users)} users with {event} "
            f"events are filtered out (the most active has {int(stats.user_pv.max())}); lower --min-pv"
        )
    writers = {s: _SplitWriter(tmp / s, p.row_group_size, p.rows_per_file) for s in _SPLITS}
    blocks = _merged_blocks(runs) if runs else read()
    try:
        kept_users = _pass2(blocks, stats, p, writers)
    except _NoNegatives as e:
        raise DataError(
            f"{path}: no negatives for {e.users} users after 1000 draws each: they viewed (nearly) all "
            f"{len(stats.items)} items; use more rows or fewer --negatives"
        ) from None
    splits = {s: w.close() for s, w in writers.items()}
    if runs:
        shutil.rmtree(tmp / ".sort")
    return stats, kept_users, splits, not runs


def convert(input_csv: str | Path, out_dir: str | Path, params: Optional[TaobaoParams] = None) -> dict:
    """Converts a Taobao UserBehavior CSV to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    ``out_dir`` is replaced as a whole, and only once the new data set is complete: it is written into a
    temporary folder beside ``out_dir`` (which also holds the sorted runs of a file that needs sorting)
    and swapped in at the end (:func:`datasets.convert_io.staged_output`).

    Args:
        input_csv: the raw CSV (no header, any row order; see the module docstring).
        out_dir: output folder: new, empty, or a previous conversion (nothing but ``meta.json`` and the
            split folders of ``part-*.parquet``).
        params: protocol parameters (default: DARE's).

    Returns:
        The meta written to ``meta.json``: ``params``, ``num_ids`` (real ids per table), ``table_sizes``,
        ``counts`` (CSV rows, pv rows, users, kept users, items, categories), ``splits`` (rows, positives,
        files per split) and ``sorted_input`` (False when the file had to be sorted first).

    Raises:
        DataError: missing, empty or unreadable file; malformed row (file, line, column, expected value);
            no pv rows; no user with ``min_pv`` pv events; users who viewed (nearly) every item, leaving
            no negatives to sample.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params``.
    """
    p = params or TaobaoParams()
    p.check()
    path = str(input_csv)
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        stats, kept_users, splits, sorted_input = _samples(lambda: _blocks(path, p.block_size), path, p, tmp)
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
            "sorted_input": sorted_input,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


taobao_schema = canonical_schema_from_meta  # the schema of this converter's output, from its meta.json dict


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code: 0 done, 2 bad arguments or output
    folder, 3 bad input (one line on stderr, never a traceback)."""
    d = TaobaoParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.taobao", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="UserBehavior.csv (any row order)")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--min-pv", type=int, default=d.min_pv)
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--negatives", type=int, default=d.negatives)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--train-targets", type=int, default=d.train_targets)
    ap.add_argument("--train-stride", type=int, default=d.train_stride)
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size,
                    help="rows per parquet row group (the unit a reader holds in memory)")
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="rows per part-*.parquet file")
    a = ap.parse_args(argv)
    params = TaobaoParams(
        min_pv=a.min_pv,
        max_len=a.max_len,
        negatives=a.negatives,
        seed=a.seed,
        train_targets=a.train_targets,
        train_stride=a.train_stride,
        row_group_size=a.row_group_size,
        rows_per_file=a.rows_per_file,
    )
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "counts": meta["counts"], "splits": meta["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
