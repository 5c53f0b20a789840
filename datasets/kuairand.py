"""Converter of KuaiRand (Kuaishou) exposure logs to the canonical parquet table; every exposure is a sample.

Inputs: the log files ``log_standard_4_08_to_4_21_<v>.csv``, ``log_standard_4_22_to_5_08_<v>.csv`` and
``log_random_4_22_to_5_08_<v>.csv`` (``<v>`` = ``pure``, ``1k`` or ``27k``; header ``user_id,video_id,date,
hourmin,time_ms,is_click,is_like,...,is_rand,tab``, columns in any order), given in any order or as globs, and
optionally ``video_features_basic_<v>.csv`` (``--videos``; the category of a video is the first of its
``tag`` list).

File order. The logs are read in their published order: by the start date in the name (``4_08`` before
``4_22``), then ``standard`` before ``random``, then by name; a file whose name does not follow the pattern
comes after them, by name. ``meta["inputs"]`` lists the order used. As the rows are sorted per user by
``time_ms`` (out of core, :mod:`datasets.taobao_csv`, in the output's temporary folder), the file order only
decides ties (equal ``time_ms``), which keep the file order then the row order.

Protocol: one sample per log row: ``label`` = ``is_click``. A sample's history is the user's clicks
(``is_click`` = 1, from every log file, random exposures included) strictly before its ``time_ms``, the most
recent ``max_len``, oldest first; the user-item cross features of a behaviour are ``hist_behavior_type``
3 (``fav``: the click was liked, ``is_like`` = 1) or 1 (``pv``: a click without a like; the canonical
``cart`` / ``buy`` have no KuaiRand counterpart) and ``hist_time_delta`` = seconds between the behaviour and
the target (``time_ms`` difference / 1000). Ids are remapped from 1 (0 = padding) in increasing raw-id order;
categories likewise over the first tags of the logged videos, a video without a tag (or without a features
row, or with no ``--videos``) getting the category ``none`` (``meta["category_names"]``; counted in
``meta["counts"]["videos_without_tag"]``).

Splits: ``is_rand`` has no column in the canonical table, so it is kept as a split: rows with ``is_rand`` = 1
(the random, unbiased exposures) form ``random``; the other rows are split by ``date``: ``train`` before
``valid_from``, ``valid`` before ``test_from``, ``test`` from it on. No row is dropped (``meta["dropped"]`` is
empty; every row is in exactly one split).

Output: ``OUT/{train,valid,test,random}/part-*.parquet`` and ``OUT/meta.json`` (``table_sizes`` for
``data.meta_path``); ``OUT`` is replaced atomically (:func:`datasets.convert_io.staged_output`).

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or output folder; 3 bad input, one line)::

    python -m datasets.kuairand --input 'log_*_pure.csv' --out DIR [--videos video_features_basic_pure.csv]
        [--valid-from 20220430] [--test-from 20220504] [--max-len 200] [--row-group-size 65536]
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.canonical import BEHAVIOR_TYPES, canonical_schema, canonical_schema_from_meta
from datasets.convert_io import run_converter, staged_output
from datasets.schema import DataError
from datasets.taobao_csv import ID_PATTERN, _check, _check_pattern, _csv_batches, _ints
from datasets.taobao_samples import EventParams, _Events, _event_samples

__all__ = ["KuaiRandParams", "convert", "kuairand_schema", "order_logs", "main"]

SPLITS = ["train", "valid", "test", "random"]
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in SPLITS}}
LOG_COLUMNS = ["user_id", "video_id", "date", "time_ms", "is_click", "is_like", "is_rand"]
_LOG_NAME = re.compile(r"^log_(standard|random)_(\d{1,2})_(\d{2})_to_(\d{1,2})_(\d{2})")


@dataclass
class KuaiRandParams(EventParams):
    """:class:`EventParams` plus the date split of the non-random rows (``yyyymmdd``): ``train`` before
    ``valid_from``, ``valid`` before ``test_from``, ``test`` from it on."""

    valid_from: int = 20220430
    test_from: int = 20220504

    def check(self) -> None:
        super().check()
        if not self.valid_from <= self.test_from:
            raise ValueError(f"invalid KuaiRandParams: need valid_from <= test_from (got {self.valid_from}, "
                             f"{self.test_from})")


def order_logs(paths: Sequence[str | Path]) -> list[str]:
    """The log files in published order (see the module docstring); globs are expanded.

    Raises:
        DataError: a glob that matches nothing; a file given twice.
    """
    files: list[str] = []
    for p in map(str, paths):
        if glob.has_magic(p):
            matched = sorted(glob.glob(p))
            if not matched:
                raise DataError(f"{p}: no file matches; expected KuaiRand log files log_standard_*.csv, log_random_*")
            files += matched
        else:
            files.append(p)
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise DataError(f"{twice[0]}: given twice; expected each log file once")

    def key(f: str) -> tuple:
        m = _LOG_NAME.match(Path(f).name)
        if m is None:
            return (1, 0, 0, 0, Path(f).name)
        return (0, int(m.group(2)), int(m.group(3)), 0 if m.group(1) == "standard" else 1, Path(f).name)

    return sorted(files, key=key)


def read_video_tags(path: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted video ids [V], first tag [V] (-1: no tag))`` of ``video_features_basic_*.csv``; a video listed
    twice keeps its first row.

    Raises:
        DataError: unreadable file, missing header, bad video id or tag list (line, column, expected value).
    """
    ids, tags = [], []
    for line, batch in _csv_batches(path, None, block_size, required=["video_id", "tag"],
                                    what="KuaiRand's video_features_basic_*.csv"):
        _check_pattern(path, batch, line, "video_id", ID_PATTERN, "a non-negative integer id")
        tag = pc.fill_null(batch.column("tag"), "")
        _check(path, batch, line, "tag", pc.match_substring_regex(tag, r"^\s*([0-9]+(\s*,\s*[0-9]+)*)?\s*$"),
               "a comma-separated list of integer tags (or empty)")
        first = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(tag, ","), 0))  # "" for no tag
        ids.append(_ints(batch, "video_id"))
        tags.append(pc.cast(pc.if_else(pc.equal(first, ""), "-1", first), pa.int64()).to_numpy())
    vid, tag = np.concatenate(ids), np.concatenate(tags)
    vid, first = np.unique(vid, return_index=True)
    return vid, tag[first]


class _Reader:
    """Streams the logs (in order) as :class:`_Events` blocks, validating every value; a complete pass
    leaves the rows per file in :attr:`rows_per_file`."""

    def __init__(self, files: list[str], p: KuaiRandParams) -> None:
        self.files, self.p = files, p
        self.rows_per_file: dict[str, int] = {}

    def __call__(self) -> Iterator[_Events]:
        rows: dict[str, int] = {}
        for path in self.files:
            rows[path] = 0
            for line, batch in _csv_batches(path, None, self.p.block_size, required=LOG_COLUMNS,
                                            what="a KuaiRand log_*.csv file"):
                for column in ("user_id", "video_id"):
                    _check_pattern(path, batch, line, column, ID_PATTERN, "a non-negative integer id")
                _check_pattern(path, batch, line, "date", r"^20[0-9]{6}$", "a date yyyymmdd")
                _check_pattern(path, batch, line, "time_ms", r"^[0-9]{1,18}$", "an integer unix time in milliseconds")
                for column in ("is_click", "is_like", "is_rand"):
                    _check(path, batch, line, column, pc.is_in(batch.column(column), value_set=pa.array(["0", "1"])),
                           "0 or 1")
                click = pc.equal(batch.column("is_click"), "1").to_numpy(zero_copy_only=False)
                like = pc.equal(batch.column("is_like"), "1").to_numpy(zero_copy_only=False)
                rand = pc.equal(batch.column("is_rand"), "1").to_numpy(zero_copy_only=False)
                date = _ints(batch, "date")
                by_date = np.where(date < self.p.valid_from, 0, np.where(date < self.p.test_from, 1, 2))
                split = np.where(rand, 3, by_date)
                yield _Events(
                    users=_ints(batch, "user_id"),
                    ts=_ints(batch, "time_ms"),
                    items=_ints(batch, "video_id"),
                    label=click.astype(np.int8),
                    btype=np.where(click, np.where(like, BEHAVIOR_TYPES["fav"], BEHAVIOR_TYPES["pv"]), 0),
                    split=split.astype(np.int8),
                )
                rows[path] += batch.num_rows
        self.rows_per_file = rows


def convert(inputs: Sequence[str | Path], out_dir: str | Path, params: Optional[KuaiRandParams] = None,
            videos: Optional[str | Path] = None) -> dict:
    """Converts KuaiRand logs to ``out_dir/{train,valid,test,random}`` parquet and ``meta.json``.

    Args:
        inputs: log files or globs, in any order (:func:`order_logs` orders them).
        out_dir: output folder: new, empty, or a previous conversion (replaced as a whole once complete).
        params: protocol parameters.
        videos: ``video_features_basic_*.csv`` (categories), or None (every video in category ``none``).

    Returns:
        The meta written to ``meta.json``: ``inputs`` (in the order read), ``params``, ``num_ids``,
        ``table_sizes``, ``counts``, ``dropped`` (empty), ``category_names``, ``splits``, ``sorted_input``.

    Raises:
        DataError: no input; unreadable file; missing header or column; a malformed line (file, line, column,
            expected value); no rows.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params``.
    """
    p = params or KuaiRandParams()
    p.check()
    files = order_logs(inputs)
    if not files:
        raise DataError("no KuaiRand log file given; expected log_standard_*.csv / log_random_*.csv")
    vid, tag = read_video_tags(str(videos), p.block_size) if videos is not None else (np.empty(0, np.int64),) * 2

    def categorize(items: np.ndarray) -> np.ndarray:
        """``[I]`` raw video ids -> ``[I]`` first tag, -1 for none."""
        if not len(vid):
            return np.full(len(items), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(vid, items), len(vid) - 1)
        return np.where(vid[at] == items, tag[at], -1)

    read = _Reader(files, p)
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        stats, cats, splits, sorted_input = _event_samples(
            read, tmp, p, SPLITS, categorize, 1e-3, f"{files[0]}: no rows in {len(files)} log file(s); expected "
            f"KuaiRand log rows")
        meta = {
            "inputs": files,
            "videos": None if videos is None else str(videos),
            "protocol": "every exposure a sample, label is_click; history = earlier clicks (fav = liked); "
                        "is_rand = 1 rows in the split 'random', the others split by date",
            "params": asdict(p),
            "num_ids": {"user_id": len(stats.users), "item_id": len(stats.items), "item_category": len(cats)},
            "table_sizes": canonical_schema(len(stats.users), len(stats.items), len(cats)).table_sizes(),
            "counts": {
                "log_rows": stats.rows,
                "rows_per_file": read.rows_per_file,
                "clicks": stats.positives,
                "users": len(stats.users),
                "items": len(stats.items),
                "categories": len(cats),
                "videos_without_tag": int(np.count_nonzero(categorize(stats.items) < 0)),
            },
            "dropped": {},
            "category_names": ["none" if c < 0 else f"tag {c}" for c in cats.tolist()],
            "behavior_types": {"1": "pv: a click without a like", "3": "fav: a liked click"},
            "splits": splits,
            "sorted_input": sorted_input,
        }
        assert sum(s["rows"] for s in splits.values()) == stats.rows, "every row is one sample"
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


kuairand_schema = canonical_schema_from_meta  # the schema of this converter's output, from its meta.json dict


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = KuaiRandParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.kuairand", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, nargs="+", help="log files or globs, any order")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--videos", help="video_features_basic_*.csv (category = first tag)")
    ap.add_argument("--valid-from", type=int, default=d.valid_from, help="yyyymmdd: first day of 'valid'")
    ap.add_argument("--test-from", type=int, default=d.test_from, help="yyyymmdd: first day of 'test'")
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size)
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file)
    ap.add_argument("--sort-rows", type=int, default=d.sort_rows, help="rows per sorted run (out-of-core sort)")
    a = ap.parse_args(argv)
    params = KuaiRandParams(max_len=a.max_len, row_group_size=a.row_group_size, rows_per_file=a.rows_per_file,
                            sort_rows=a.sort_rows, valid_from=a.valid_from, test_from=a.test_from)
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params, a.videos), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "inputs": meta["inputs"], "counts": meta["counts"], "dropped": meta["dropped"],
                      "splits": meta["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
