"""Converter of RecFlow (Kuaishou, ICLR 2025) to request-level parquet for pre-ranking (DUET): one row per request,
the user's recent effective views as the history and every stage sample of the request as its candidates.

Input: the published folder (``--input RECFLOW_ROOT``)::

    all_stage/2024-MM-DD.feather      every stage sample of the day, one row per (request, video)
    seq_effective_50_dict/DATE.pkl    dict request_id -> int64 [50, 10]: the user's last 50 effective views
    others/id_cnt.pkl                 dict field -> cardinality (user_id, device_id, gender, age, province,
                                      photo_id, author_id, category_level_two, ...)

``realshow/`` (the exposed rows, already in ``all_stage`` with ``realshow`` = 1) and ``request_id_dict/`` (the
rows of ``all_stage`` again, per request and stage) are not read. The pickles are trusted input (unpickling can
run code). Days are the ``YYYY-MM-DD.feather`` files of ``all_stage/``, read in date order, one at a time: a day
is read (column by column), validated, sorted by request with pyarrow, written, and freed before the next
(memory: about 100 bytes per all_stage row of the day, some 5 GB for a full day of about 51M rows, then that
day's pickle).

One output row per request (columns, arrow types)::

    request_id      int64           RecFlow's request id, as published (unique over all splits; group column)
    user_id         int64           \\
    user_age        int64            |  the request's user (``age``, ``gender``, ``province``, ``device_id``
    user_gender     int64            |  of its all_stage rows, which must agree within the request)
    user_province   int64            |
    device_id       int64           /
    hist_item_id    list<int64>     group "history": the request's seq_effective_50_dict entry, padding
    hist_category   list<int64>     removed, oldest first (video_id and cate_two)
    cand_item_id    list<int64>     group "candidates": the request's all_stage rows (exposed and unexposed)
    cand_category   list<int64>       category_level_two
    cand_author_id  list<int64>
    cand_cross      list<int64>       1 + min(7, floor(log2(1 + h))), h = history behaviours of the candidate's
                                      category: 1..8 (1..6 with 50 behaviours), table size 9
    cand_stage      list<float32>     stage priority: realshow 5, rerank_pos = rank_pos 4, rerank_neg =
                                      rank_neg 3, coarse_neg 2, prerank_neg 1 (the highest flag set); not a
                                      model input: it reveals exposure (for stage-aware losses)
    cand_click      list<float32>     sequence label: effective_view of an exposed candidate, 0 if unexposed
    cand_exposed    list<float32>     sequence label: realshow

RecFlow logs no propensities, so there is no ``cand_propensity``; and no ``cand_true_click``: whether an
unexposed candidate would have been viewed is unknown in logged data.

Ids: 0 is padding, a RecFlow id ``x`` becomes ``x + 1``. ``id_cnt.pkl`` does not say whether its value ``n``
counts the ids ``0..n-1`` or is the largest id, so raw ids ``0..n`` are accepted and tables have ``n + 2`` rows:
the authors' tables (``RecFlow-ICLR/RecFlow`` DSSM/DIN: ``id_cnt[field] + 2`` rows, ids ``+ 1``, 0 = padding).
``meta["counts"]["max_raw_id"]`` gives the largest raw id seen per field. ``t_item_id`` (``photo_id``) and
``t_item_category`` (``category_level_two``) are shared by history and candidates; ``t_cand_author_id``
(``author_id``); ``t_cand_cross`` has 9 rows. An id outside ``0..n`` is bad input.

Category: ``category_level_two`` (the sequences' ``cate_two``): the finer of RecFlow's two levels, and the one
the authors embed like an id (level one is kept raw with its own padding value there). The cross feature
counts history behaviours of the same level-two category.

History: a sequence entry is valid where column 7 (``request_timestamp``) is > 0 (a ``video_id`` of 0 is a
real video); the valid entries are ordered by that timestamp, stably, oldest first. A published array is
left-padded and already in that order; ``meta["counts"]["histories_reordered"]`` counts those that were not.
Pickle entries that give no output row (a request without candidates, an id not in all_stage) are counted in
``meta["counts"]["sequences_unused"]``.

Candidates: a row's stage is the highest priority among its set flags; a row with no flag at all has no place
in the funnel and is dropped (``meta["dropped"]``). With ``--max-candidates K`` (0: no cap) a request keeps its
``K`` candidates of the furthest stages, ties broken at random; the others are dropped and counted. Within a
request the candidates come in a pseudo-random order (``numpy.random.default_rng([seed, yyyymmdd])`` per day),
so that the position tells neither stage nor exposure. An ``effective_view`` of 1 on an unexposed row becomes
a ``cand_click`` of 0 (``meta["counts"]["effective_view_of_unexposed"]``). A request whose rows all lack a stage
flag has no output row (``meta["counts"]["requests_without_candidates"]``).

Splits by day (RecFlow's protocol: test on 2024-02-18): ``train/`` the days before the valid day, ``valid/`` the
valid day (default: the day before the test day), ``test/`` the test day; the days after the test day, and
those between an earlier ``--valid-day`` and the test day, are in no split (their rows counted as dropped).
Requests keep the published order: days by date, then ``request_id``.

Bad input is one :class:`DataError` naming the file, the row (0-based index in the feather file) or request
id, the column, the value and what was expected: a missing file or column, a non-integer column, a null, a
flag or ``effective_view`` other than 0/1, an id outside its cardinality, user fields that differ within a
request, a request id in two days, a request with no sequence entry, a sequence entry that is not an integer
array ``[50, 10]``.

Output: ``OUT/{train,valid,test}/part-*.parquet`` and ``OUT/meta.json`` (``table_sizes`` for
``data.meta_path``, ``params``, ``counts``, ``splits``, ``dropped``); ``OUT`` is replaced atomically
(:func:`datasets.convert_io.staged_output`).

Modules: this one holds the parameters (:class:`RecFlowParams`), :func:`convert` (days to splits, counts,
``meta.json``) and the CLI; :mod:`datasets.recflow_read` reads and validates the published layout (``id_cnt.pkl``,
the day files, a day's all_stage rows, the histories); :mod:`datasets.recflow_write` turns a day into request rows
and writes them (the output schema, the cap and the order of candidates, the cross feature, the split writer).

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or an ``--out`` that is not a previous output;
3 bad input, one line on stderr; 130 Ctrl-C)::

    python -m datasets.recflow --input RECFLOW_ROOT --out DIR [--test-day 2024-02-18] [--valid-day DAY]
        [--max-candidates 500] [--seed 0] [--row-group-size 4096] [--rows-per-file 65536]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.convert_io import run_converter, staged_output
from datasets.recflow_read import STAGE_PRIORITY, _count_rows, _day_files, read_id_cnt
from datasets.recflow_write import (
    STAGE_NAMES,
    _convert_day,
    _RequestWriter,
    _table_sizes,
    recflow_arrow_schema,
    recflow_schema,
)
from datasets.schema import DataError

__all__ = ["RecFlowParams", "STAGE_PRIORITY", "convert", "main", "recflow_arrow_schema", "recflow_schema"]

SPLITS = ["train", "valid", "test"]
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in SPLITS}}


def _day(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a date YYYY-MM-DD") from None


@dataclass
class RecFlowParams:
    """Protocol and layout parameters; see the module docstring.

    Attributes:
        test_day: the test split's day.
        valid_day: the valid split's day (None: the day before ``test_day``); train = the days before it.
        max_candidates: most candidates kept per request, furthest stages first (0: all).
        seed: seed of the order of candidates within a request (and of the ties the cap breaks).
        row_group_size: requests per parquet row group.
        rows_per_file: requests per parquet file.
    """

    test_day: str = "2024-02-18"
    valid_day: Optional[str] = None
    max_candidates: int = 500
    seed: int = 0
    row_group_size: int = 4096
    rows_per_file: int = 65536

    def days(self) -> tuple[dt.date, dt.date]:
        """``(valid day, test day)``."""
        test = _day(self.test_day, "test_day")
        valid = _day(self.valid_day, "valid_day") if self.valid_day is not None else test - dt.timedelta(days=1)
        return valid, test

    def check(self) -> None:
        valid, test = self.days()
        problems = []
        if not valid < test:
            problems.append(f"valid_day {valid} must come before test_day {test}")
        if self.max_candidates < 0:
            problems.append(f"max_candidates must be >= 0 (0 = all), got {self.max_candidates}")
        if self.row_group_size < 1 or self.rows_per_file < 1:
            problems.append(f"row_group_size and rows_per_file must be >= 1, got {self.row_group_size}, "
                            f"{self.rows_per_file}")
        if problems:
            raise ValueError("invalid RecFlowParams: " + "; ".join(problems))


def convert(root: str | Path, out_dir: str | Path, params: Optional[RecFlowParams] = None) -> dict:
    """Converts a RecFlow folder to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    Args:
        root: the published RecFlow folder (``all_stage/``, ``seq_effective_50_dict/``, ``others/id_cnt.pkl``).
        out_dir: output folder: new, empty, or a previous conversion (replaced as a whole once complete).
        params: protocol parameters.

    Returns:
        The meta written to ``meta.json``: ``source``, ``inputs`` (the day files read, in order), ``params``,
        ``id_cnt``, ``table_sizes``, ``counts``, ``dropped`` (rows by reason), ``splits``.

    Raises:
        DataError: bad input (see the module docstring); the test or valid day has no file.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params``.
    """
    p = params or RecFlowParams()
    p.check()
    valid_day, test_day = p.days()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected the RecFlow folder (all_stage/, seq_effective_50_dict/, "
                        f"others/id_cnt.pkl)")
    id_cnt = read_id_cnt(root / "others" / "id_cnt.pkl")
    days = _day_files(root)
    for want, what in ((valid_day, "valid"), (test_day, "test")):
        if want not in [d for d, _ in days]:
            raise DataError(f"{root / 'all_stage' / (want.isoformat() + '.feather')}: no such file; the {what} day "
                            f"needs its all_stage file (days found: {days[0][0]}..{days[-1][0]})")
    used = [(d, f) for d, f in days if d <= valid_day or d == test_day]
    for d, _ in used:
        s = root / "seq_effective_50_dict" / f"{d.isoformat()}.pkl"
        if not s.is_file():
            raise DataError(f"{s}: no such file; expected the day's seq_effective_50_dict pickle")
    counts: dict = {
        "all_stage_rows": 0, "rows_per_day": {}, "rows_by_stage": {name: 0 for name in STAGE_NAMES.values()},
        "rows_with_several_stage_flags": 0, "effective_view_of_unexposed": 0, "requests_without_candidates": 0,
        "histories_reordered": 0, "sequences_unused": 0, "max_raw_id": {},
    }
    between = f"rows of days between the valid day {valid_day} and the test day {test_day}"
    after = f"rows of days after the test day {test_day}"
    dropped = {"rows with no stage flag": 0,
               f"candidates beyond max_candidates={p.max_candidates} (lowest stages first)": 0, between: 0, after: 0}
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        writers = {s: _RequestWriter(tmp / s, p.row_group_size, p.rows_per_file) for s in SPLITS}
        seen: list[tuple[Path, np.ndarray]] = []
        for d, f in days:
            split = "train" if d < valid_day else "valid" if d == valid_day else "test" if d == test_day else None
            if split is not None:
                _convert_day(f, d, root / "seq_effective_50_dict" / f"{d.isoformat()}.pkl", id_cnt, p,
                             writers[split], counts, dropped, seen)
            else:  # not in a split: only counted
                n = _count_rows(f)
                dropped[after if d > test_day else between] += n
                counts["all_stage_rows"] += n
                counts["rows_per_day"][d.isoformat()] = n
        splits = {s: w.close() for s, w in writers.items()}
        candidates = sum(s["candidates"] for s in splits.values())
        counts.update(requests=sum(s["rows"] for s in splits.values()), candidates=candidates,
                      exposed=sum(s["exposed"] for s in splits.values()),
                      clicks=sum(s["clicks"] for s in splits.values()))
        meta = {
            "source": str(root),
            "protocol": "one row per request: history = seq_effective_50_dict (unpadded, oldest first), candidates "
                        "= every all_stage row of the request with a stage flag (capped at max_candidates, furthest "
                        "stages first, in random order); cand_click = effective_view of exposed candidates; splits "
                        "by day",
            "inputs": [str(f) for _, f in used],
            "params": asdict(p),
            "id_cnt": id_cnt,
            "id_mapping": "raw id x -> x + 1 (0 = padding); raw ids 0..id_cnt[field], tables id_cnt[field] + 2",
            "table_sizes": _table_sizes(id_cnt),
            "counts": counts,
            "dropped": dropped,
            "splits": splits,
        }
        assert counts["all_stage_rows"] == candidates + sum(dropped.values()), "every row is kept or dropped"
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = RecFlowParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.recflow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="the RecFlow folder (all_stage/, seq_effective_50_dict/, others/)")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--test-day", default=d.test_day, help="YYYY-MM-DD: the test split's day")
    ap.add_argument("--valid-day", default=None, help="YYYY-MM-DD: the valid split's day (default: the day before "
                                                      "the test day)")
    ap.add_argument("--max-candidates", type=int, default=d.max_candidates,
                    help="candidates kept per request, furthest stages first (0: all)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the candidates' order within a request")
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size, help="requests per row group")
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="requests per parquet file")
    a = ap.parse_args(argv)
    params = RecFlowParams(test_day=a.test_day, valid_day=a.valid_day, max_candidates=a.max_candidates, seed=a.seed,
                           row_group_size=a.row_group_size, rows_per_file=a.rows_per_file)
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "counts": {k: v for k, v in meta["counts"].items() if k != "rows_per_day"},
                      "dropped": meta["dropped"], "splits": meta["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
