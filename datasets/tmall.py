"""Converter of Tmall IJCAI-15 (Tianchi 42) ``user_log_format1.csv`` to the canonical parquet table, with the
Taobao protocol (DARE) on the click events.

Input: ``user_log_format1.csv`` with header ``user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type``
(the columns may come in any order; ``time_stamp`` is ``MMDD`` of 2015, ``action_type`` 0 click, 1 cart, 2 buy,
3 fav; ``brand_id`` may be empty, as in the published file). The published file (about 55M rows) is not
time-ordered, so the rows are sorted out of core by ``(user_id, time_stamp)`` first, ties in file order
(:mod:`datasets.taobao_csv`: sorted runs of ``sort_rows`` rows in the output's temporary folder, then a k-way
merge); a file already in that order is read as it is.

Protocol: exactly :mod:`datasets.taobao`'s (:class:`TaobaoParams`, same defaults and CLI options) with
``action_type == 0`` (click) in the role of Taobao's ``pv``: ids remapped from 1 (0 = padding) over the click
events in increasing raw-id order; users with at least ``min_pv`` clicks kept; per kept user 19 train targets
(``-3, -8, ..., -93``), valid ``-2``, test ``-1``; histories are the most recent ``max_len`` clicks before the
target; ``negatives`` negatives per positive sampled by click frequency and never among the user's clicks.
``hist_behavior_type`` is 1 (pv = click) throughout; ``hist_time_delta`` is in seconds, whole days here
(``MMDD`` is read as midnight UTC of that day of 2015, so deltas count calendar days).

Output: ``OUT/{train,valid,test}/part-*.parquet`` (canonical schema, :mod:`datasets.canonical`) and
``OUT/meta.json`` (``table_sizes`` for ``data.meta_path``, counts, params). Every row that is not in a
sample's sequence is counted in ``meta["dropped"]`` with its reason (the non-click action types, and the clicks
of users with fewer than ``min_pv`` clicks) and printed by the CLI. ``OUT`` is replaced atomically
(:func:`datasets.convert_io.staged_output`).

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or an ``--out`` that is not a previous output;
3 bad input, one line on stderr naming the file, line, column and the expected value)::

    python -m datasets.tmall --input user_log_format1.csv --out DIR [--min-pv 210] [--max-len 200]
        [--negatives 2] [--seed 0] [--train-targets 19] [--train-stride 5] [--row-group-size 65536]
        [--rows-per-file 4194304] [--sort-rows 4194304]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.canonical import canonical_schema, canonical_schema_from_meta
from datasets.convert_io import run_converter, staged_output
from datasets.taobao import _OUTPUT_ENTRIES, TaobaoParams, _samples
from datasets.taobao_csv import ID_PATTERN, _Block, _check, _check_pattern, _csv_batches, _ints

__all__ = ["ACTION_TYPES", "convert", "tmall_schema", "main"]

COLUMNS = ["user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp", "action_type"]
#: Tmall's action types; 0 (click) is the event the protocol keeps.
ACTION_TYPES = {"0": "click", "1": "cart", "2": "buy", "3": "fav"}
_YEAR_START = 1420070400  # 2015-01-01T00:00:00Z
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])  # 2015 is not a leap year
_MONTH_START = np.concatenate([[0], np.cumsum(_MONTH_DAYS)[:-1]])


def mmdd_seconds(mmdd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``MMDD`` integers -> (unix seconds of that day of 2015 at 00:00 UTC ``[R]``, valid date ``[R]`` bool)."""
    month, day = mmdd // 100, mmdd % 100
    m = np.clip(month, 1, 12) - 1
    ok = (month >= 1) & (month <= 12) & (day >= 1) & (day <= _MONTH_DAYS[m])
    return _YEAR_START + (_MONTH_START[m] + day - 1) * 86_400, ok


class _Reader:
    """Streams the log as Taobao blocks (``pv`` = click), validating every value; each complete pass leaves
    the rows per action type in :attr:`action_counts`."""

    def __init__(self, path: str, block_size: int) -> None:
        self.path, self.block_size = path, block_size
        self.action_counts: dict[str, int] = {}

    def __call__(self) -> Iterator[_Block]:
        path, counts = self.path, Counter()
        for line, batch in _csv_batches(path, None, self.block_size, required=COLUMNS,
                                        what="Tmall's user_log_format1.csv"):
            for column in ("user_id", "item_id", "cat_id", "seller_id"):
                _check_pattern(path, batch, line, column, ID_PATTERN, "a non-negative integer id")
            _check_pattern(path, batch, line, "brand_id", r"^([0-9]{1,18})?$", "a non-negative integer id or empty")
            _check_pattern(path, batch, line, "time_stamp", r"^[0-9]{3,4}$", "a date MMDD (e.g. 1111)")
            ts, ok = mmdd_seconds(_ints(batch, "time_stamp"))
            _check(path, batch, line, "time_stamp", pa.array(ok), "a date MMDD of 2015 (month 01-12, a day of it)")
            action = batch.column("action_type")
            _check(path, batch, line, "action_type", pc.is_in(action, value_set=pa.array(list(ACTION_TYPES))),
                   "an action type 0 (click), 1 (cart), 2 (buy) or 3 (fav)")
            values, n = np.unique(action.to_numpy(zero_copy_only=False), return_counts=True)
            counts.update(dict(zip(values.tolist(), n.tolist())))
            yield _Block(
                users=_ints(batch, "user_id"),
                items=_ints(batch, "item_id"),
                cats=_ints(batch, "cat_id"),
                pv=pc.equal(action, "0").to_numpy(zero_copy_only=False),
                ts=ts,
            )
        self.action_counts = {f"{a} ({name})": int(counts.get(a, 0)) for a, name in ACTION_TYPES.items()}


def convert(input_csv: str | Path, out_dir: str | Path, params: Optional[TaobaoParams] = None) -> dict:
    """Converts Tmall's ``user_log_format1.csv`` to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    Args:
        input_csv: the raw log (header line, any row order).
        out_dir: output folder: new, empty, or a previous conversion (replaced as a whole once complete).
        params: the Taobao protocol parameters (default: DARE's), ``min_pv`` counting clicks.

    Returns:
        The meta written to ``meta.json``: ``params``, ``num_ids``, ``table_sizes``, ``counts`` (CSV rows
        by action type, click rows, users, kept users, items, categories), ``dropped`` (rows by reason),
        ``splits`` and ``sorted_input``.

    Raises:
        DataError: missing, empty or unreadable file; missing header; malformed row (file, line, column,
            expected value); no clicks; no user with ``min_pv`` clicks; no negatives to sample.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params``.
    """
    p = params or TaobaoParams()
    p.check()
    path = str(input_csv)
    read = _Reader(path, p.block_size)
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        stats, kept_users, splits, sorted_input = _samples(
            read, path, p, tmp, event="click", no_events="no click rows (action_type 0); expected Tmall user_log rows"
        )
        kept_clicks = int(stats.user_pv[stats.user_pv >= p.min_pv].sum())
        dropped = {f"action_type {k}": v for k, v in read.action_counts.items() if not k.startswith("0 ")}
        dropped[f"clicks of users with fewer than min_pv={p.min_pv} clicks"] = stats.pv_rows - kept_clicks
        sizes = canonical_schema(len(stats.users), len(stats.items), len(stats.cats)).table_sizes()
        meta = {
            "source": path,
            "protocol": "DARE's Taobao protocol (thuml/DARE) on Tmall clicks (action_type 0); histories unpadded",
            "params": asdict(p),
            "num_ids": {"user_id": len(stats.users), "item_id": len(stats.items), "item_category": len(stats.cats)},
            "table_sizes": sizes,
            "counts": {
                "csv_rows": stats.csv_rows,
                "rows_by_action_type": read.action_counts,
                "click_rows": stats.pv_rows,
                "csv_users": stats.csv_users,
                "click_users": len(stats.users),
                "kept_users": kept_users,
                "kept_clicks": kept_clicks,
                "items": len(stats.items),
                "categories": len(stats.cats),
            },
            "dropped": dropped,
            "splits": splits,
            "sorted_input": sorted_input,
        }
        assert stats.csv_rows == kept_clicks + sum(dropped.values()), "every row is kept or counted as dropped"
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


tmall_schema = canonical_schema_from_meta  # the schema of this converter's output, from its meta.json dict


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = TaobaoParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.tmall", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="user_log_format1.csv (header line, any row order)")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--min-pv", type=int, default=d.min_pv, help="keep users with at least this many clicks")
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--negatives", type=int, default=d.negatives)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--train-targets", type=int, default=d.train_targets)
    ap.add_argument("--train-stride", type=int, default=d.train_stride)
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size)
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file)
    ap.add_argument("--sort-rows", type=int, default=d.sort_rows,
                    help="rows per sorted run (about 40 bytes each held in memory while sorting)")
    a = ap.parse_args(argv)
    params = TaobaoParams(min_pv=a.min_pv, max_len=a.max_len, negatives=a.negatives, seed=a.seed,
                          train_targets=a.train_targets, train_stride=a.train_stride,
                          row_group_size=a.row_group_size, rows_per_file=a.rows_per_file, sort_rows=a.sort_rows)
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "counts": meta["counts"], "dropped": meta["dropped"], "splits": meta["splits"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
