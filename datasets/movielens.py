"""Converter of MovieLens ratings (ml-100k, ml-1m, ml-latest / ml-latest-small) to the canonical parquet table.

Inputs (the variant is detected from the file name, else from its first line, or given with ``--variant``):

=========  ==========================================  ==============================================
variant    ratings (``--input``)                       movies (``--movies``, default: beside ratings)
=========  ==========================================  ==============================================
100k       ``u.data``: tab, ``user item rating ts``    ``u.item``: ``|``, latin-1, 19 genre flags
1m         ``ratings.dat``: ``UserID::MovieID::Rating  ``movies.dat``: ``MovieID::Title::Genres``,
           ::Timestamp``                               latin-1, genres ``|``-separated
latest     ``ratings.csv``: header ``userId,movieId,   ``movies.csv``: header ``movieId,title,genres``
           rating,timestamp`` (half stars)             (UTF-8, quoted titles)
=========  ==========================================  ==============================================

Protocol: every rating is one sample: ``label`` = 1 when ``rating >= click_rating`` (default 4, the common
CTR convention), else 0. A user's ratings are ordered by timestamp (ties in file order); a sample's history is
the user's ratings at *earlier* timestamps (a rating in the same second as the target is not in it), the most
recent ``max_len``, oldest first, with ``hist_behavior_type`` 3 (``fav``: rated >= ``click_rating``) or 1
(``pv``: rated lower) and ``hist_time_delta`` in seconds. Split per user, leave-one-out: the last rating is
the test sample, the second-to-last the validation sample, the others training samples. Ids are remapped from
1 (0 = padding) in increasing raw-id order; the category of a movie is its *first* genre (``u.item``: the
first flag set, in the published genre order), ids in alphabetical order of the genre names (kept in
``meta["category_names"]``); a movie with no genre gets ``(no genres listed)``. No rating is dropped
(``meta["dropped"]`` is empty); a rating of a movie missing from the movies file is an error.

The ratings are streamed in blocks and, when not in (user, timestamp) order (ml-latest's ``ratings.csv``,
~33M rows, is ordered by user then movie), sorted out of core (:mod:`datasets.taobao_csv`) in the output's
temporary folder; memory is bounded by ``sort_rows`` and ``events_per_group`` (times ``max_len``).

Output: ``OUT/{train,valid,test}/part-*.parquet`` (canonical schema) and ``OUT/meta.json`` (``table_sizes``
for ``data.meta_path``); ``OUT`` is replaced atomically (:func:`datasets.convert_io.staged_output`).

CLI (exit 0; 1 the output cannot be written; 2 bad arguments or output folder; 3 bad input, one line)::

    python -m datasets.movielens --input ratings.csv --out DIR [--movies movies.csv] [--variant latest]
        [--click-rating 4] [--max-len 200] [--row-group-size 65536] [--rows-per-file 4194304]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.canonical import BEHAVIOR_TYPES, canonical_schema, canonical_schema_from_meta
from datasets.convert_io import run_converter, staged_output
from datasets.schema import DataError
from datasets.taobao_csv import ID_PATTERN, _check, _check_pattern, _csv_batches, _input_problem, _ints
from datasets.taobao_samples import EventParams, _Events, _event_samples

__all__ = ["MovieLensParams", "VARIANTS", "convert", "detect_variant", "movielens_schema", "main"]

_SPLITS = ["train", "valid", "test"]
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in _SPLITS}}
#: ml-100k's genres (u.genre), in the order of u.item's flags.
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western"]
NO_GENRE = "(no genres listed)"


@dataclass(frozen=True)
class _Variant:
    ratings: str  # file name of the ratings
    movies: str  # file name of the movies
    columns: Optional[list[str]]  # the ratings' columns (None: header line)
    delimiter: str
    layout: str  # a ratings line, for messages


VARIANTS = {
    "100k": _Variant("u.data", "u.item", ["user", "item", "rating", "timestamp"], "\t",
                     "4 tab-separated fields user id, item id, rating, timestamp"),
    # '::' read as ':' with an empty field between the values
    "1m": _Variant("ratings.dat", "movies.dat", ["UserID", "s1", "MovieID", "s2", "Rating", "s3", "Timestamp"], ":",
                   "UserID::MovieID::Rating::Timestamp"),
    "latest": _Variant("ratings.csv", "movies.csv", None, ",", "userId,movieId,rating,timestamp"),
}
_NAMES = {"100k": ("user", "item", "rating", "timestamp"), "1m": ("UserID", "MovieID", "Rating", "Timestamp"),
          "latest": ("userId", "movieId", "rating", "timestamp")}


@dataclass
class MovieLensParams(EventParams):
    """:class:`EventParams` plus ``click_rating``: a rating at least this is a click (label 1)."""

    click_rating: float = 4.0


def detect_variant(path: str) -> str:
    """The variant of a ratings file: from its name (``u.data``, ``ratings.dat``, ``ratings.csv``), else from its
    first line (``::``, a tab, or a ``userId`` header).

    Raises:
        DataError: neither tells.
    """
    for name, v in VARIANTS.items():
        if Path(path).name == v.ratings:
            return name
    problem = _input_problem(path, "a MovieLens ratings file", "of ratings")
    if problem:
        raise DataError(f"{path}: {problem}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    if "::" in first:
        return "1m"
    if "\t" in first:
        return "100k"
    if first.lstrip("\ufeff").startswith("userId"):
        return "latest"
    raise DataError(f"{path}: line 1: cannot tell the MovieLens variant from {first.strip()[:80]!r}; expected "
                    f"u.data (tab), ratings.dat ('::') or ratings.csv (header userId,...), or pass --variant")


def read_movies(path: str, variant: str) -> dict[int, str]:
    """Movie id -> first genre name (:data:`NO_GENRE` when it has none).

    Raises:
        DataError: missing/unreadable file, a line with the wrong field count or a bad movie id.
    """
    problem = _input_problem(path, f"the MovieLens {VARIANTS[variant].movies} file", "of movies")
    if problem:
        raise DataError(f"{path}: {problem}")
    out: dict[int, str] = {}
    if variant == "latest":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            rows = list(csv.reader(fh))
        if not rows or rows[0][:1] != ["movieId"]:
            got = ",".join(rows[0])[:80] if rows else ""
            raise DataError(f"{path}: line 1: missing header (got {got!r}); expected movieId,title,genres")
        lines = [(n, r) for n, r in enumerate(rows[1:], start=2)]
        width, layout = 3, "3 columns movieId,title,genres"
    else:
        text = Path(path).read_bytes().decode("latin-1")  # both files are latin-1
        sep = "|" if variant == "100k" else "::"
        lines = [(n, line.split(sep)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        width = 5 + len(GENRES_100K) if variant == "100k" else 3
        layout = ("24 '|'-separated fields movie id|title|release date|video release date|IMDb URL|19 genre flags"
                  if variant == "100k" else "MovieID::Title::Genres")
    for n, fields in lines:
        if len(fields) != width:
            raise DataError(f"{path}: line {n}: {len(fields)} fields ({'|'.join(fields)[:120]!r}); expected {layout}")
        if not fields[0].isdigit():
            raise DataError(f"{path}: line {n}, field movie id: value {fields[0]!r}; expected a non-negative integer")
        if variant == "100k":
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                raise DataError(f"{path}: line {n}: genre flags {'|'.join(flags)!r}; expected 19 flags 0 or 1")
            genre = GENRES_100K[flags.index("1")] if "1" in flags else NO_GENRE
        else:
            genre = fields[2].split("|")[0].strip() or NO_GENRE
        out[int(fields[0])] = genre
    return out


class _Reader:
    """Streams the ratings as :class:`_Events` blocks, validating every value (a new stream per call)."""

    def __init__(self, path: str, variant: str, movies: dict[int, str], movies_path: str, p: MovieLensParams) -> None:
        self.path, self.variant, self.p, self.movies_path = path, variant, p, movies_path
        self.movie_ids = np.array(sorted(movies), dtype=np.int64)

    def __call__(self) -> Iterator[_Events]:
        path, v = self.path, VARIANTS[self.variant]
        user, item, rating, ts = _NAMES[self.variant]
        required = v.columns or list(_NAMES["latest"])
        for line, batch in _csv_batches(path, v.columns, self.p.block_size, required=required,
                                        delimiter=v.delimiter, what=f"the MovieLens {v.ratings} file", layout=v.layout):
            for column in (user, item):
                _check_pattern(path, batch, line, column, ID_PATTERN, "a non-negative integer id")
            if self.variant == "1m":
                for column in ("s1", "s2", "s3"):
                    _check_pattern(path, batch, line, column, r"^$", "'::' between the fields (UserID::MovieID::...)")
            _check_pattern(path, batch, line, rating, r"^[0-9]{1,2}(\.[0-9]+)?$", "a rating number (0.5 to 5)")
            r = pc.cast(batch.column(rating), pa.float64()).to_numpy()
            _check(path, batch, line, rating, pa.array((r >= 0) & (r <= 5)), "a rating number (0.5 to 5)")
            _check_pattern(path, batch, line, ts, r"^-?[0-9]{1,18}$", "an integer unix timestamp (seconds)")
            items = _ints(batch, item)
            at = np.minimum(np.searchsorted(self.movie_ids, items), max(len(self.movie_ids) - 1, 0))
            known = self.movie_ids[at] == items if len(self.movie_ids) else np.zeros(len(items), bool)
            _check(path, batch, line, item, pa.array(known), f"a movie id of {self.movies_path}")
            click = r >= self.p.click_rating
            yield _Events(
                users=_ints(batch, user),
                ts=_ints(batch, ts),
                items=items,
                label=click.astype(np.int8),
                btype=np.where(click, BEHAVIOR_TYPES["fav"], BEHAVIOR_TYPES["pv"]).astype(np.int64),
                split=np.full(len(items), -1, dtype=np.int8),
            )


def convert(input_path: str | Path, out_dir: str | Path, params: Optional[MovieLensParams] = None,
            movies: Optional[str | Path] = None, variant: Optional[str] = None) -> dict:
    """Converts MovieLens ratings to ``out_dir/{train,valid,test}`` parquet and ``meta.json``.

    Args:
        input_path: ``u.data``, ``ratings.dat`` or ``ratings.csv``.
        out_dir: output folder: new, empty, or a previous conversion (replaced as a whole once complete).
        params: protocol parameters.
        movies: the movies file (default: the variant's file beside ``input_path``).
        variant: ``100k``, ``1m`` or ``latest`` (default: :func:`detect_variant`).

    Returns:
        The meta written to ``meta.json``: ``variant``, ``params``, ``num_ids``, ``table_sizes``, ``counts``,
        ``dropped`` (empty: every rating is a sample), ``category_names``, ``splits``, ``sorted_input``.

    Raises:
        DataError: unreadable files; unknown variant; a malformed line (file, line, column, expected value);
            a rating of a movie missing from the movies file; no ratings.
        OutputError: ``out_dir`` holds something other than a previous conversion.
        ValueError: invalid ``params`` or ``variant``.
    """
    p = params or MovieLensParams()
    p.check()
    path = str(input_path)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    variant = variant or detect_variant(path)
    movies_path = str(movies) if movies is not None else str(Path(path).parent / VARIANTS[variant].movies)
    genre_of = read_movies(movies_path, variant)
    names = sorted(set(genre_of.values()))
    key_of = {m: names.index(g) for m, g in genre_of.items()}
    read = _Reader(path, variant, genre_of, movies_path, p)
    with staged_output(out_dir, _OUTPUT_ENTRIES) as tmp:
        stats, cats, splits, sorted_input = _event_samples(
            read, tmp, p, _SPLITS, lambda items: np.array([key_of[int(i)] for i in items], dtype=np.int64), 1.0,
            f"{path}: no ratings; expected MovieLens {variant} rating lines",
        )
        meta = {
            "source": path,
            "movies": movies_path,
            "variant": variant,
            "protocol": "every rating a sample, label rating >= click_rating; history = earlier ratings; "
                        "leave-one-out split per user (last test, second-last valid)",
            "params": asdict(p),
            "num_ids": {"user_id": len(stats.users), "item_id": len(stats.items), "item_category": len(cats)},
            "table_sizes": canonical_schema(len(stats.users), len(stats.items), len(cats)).table_sizes(),
            "counts": {"rating_rows": stats.rows, "clicks": stats.positives, "users": len(stats.users),
                       "items": len(stats.items), "categories": len(cats), "movies_in_file": len(genre_of)},
            "dropped": {},
            "category_names": [names[k] for k in cats.tolist()],
            "behavior_types": {"1": "pv: rated below click_rating", "3": "fav: rated >= click_rating"},
            "splits": splits,
            "sorted_input": sorted_input,
        }
        assert sum(s["rows"] for s in splits.values()) == stats.rows, "every rating is one sample"
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


movielens_schema = canonical_schema_from_meta  # the schema of this converter's output, from its meta.json dict


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = MovieLensParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.movielens", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="u.data, ratings.dat or ratings.csv")
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous conversion; replaced)")
    ap.add_argument("--movies", help="u.item, movies.dat or movies.csv (default: beside --input)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="default: from the file name or first line")
    ap.add_argument("--click-rating", type=float, default=d.click_rating, help="label 1 when rating >= this")
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size)
    ap.add_argument("--rows-per-file", type=int, default=d.rows_per_file)
    ap.add_argument("--sort-rows", type=int, default=d.sort_rows, help="rows per sorted run (out-of-core sort)")
    a = ap.parse_args(argv)
    params = MovieLensParams(max_len=a.max_len, row_group_size=a.row_group_size, rows_per_file=a.rows_per_file,
                             sort_rows=a.sort_rows, click_rating=a.click_rating)
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: convert(a.input, a.out, params, a.movies, a.variant), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "variant": meta["variant"], "counts": meta["counts"], "dropped": meta["dropped"],
                      "splits": meta["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
