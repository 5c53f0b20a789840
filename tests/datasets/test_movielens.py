"""Tests of datasets.movielens on small fixtures written in the exact published formats of ml-100k (u.data tab,
u.item '|' latin-1), ml-1m (ratings.dat '::', movies.dat latin-1) and ml-latest (ratings.csv / movies.csv with
headers, quoted titles). All fixture rows are synthetic (made up here, not MovieLens data); expected values
are derived here in plain Python."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets.config import DataConfig
from datasets.movielens import MovieLensParams, convert, detect_variant, main, movielens_schema
from datasets.reader import eval_loader
from datasets.schema import DataError

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
# synthetic ml-100k movies: id -> genres set (u.item flags)
MOVIES_100K = {1: ["Animation", "Children's", "Comedy"], 2: ["Action", "Thriller"], 3: ["Drama"], 4: ["Comedy"],
               5: [], 7: ["Sci-Fi", "War"]}
# synthetic ratings (user, item, rating, ts), deliberately not in time order; user 9 has a tie at ts 500
RATINGS = [(9, 3, 4, 520), (2, 1, 5, 100), (9, 1, 2, 500), (2, 2, 3, 90), (9, 2, 5, 500), (2, 7, 4, 300),
           (9, 4, 1, 400), (2, 4, 4, 200), (9, 5, 4, 600), (2, 3, 1, 400)]
SMALL = MovieLensParams(max_len=3, row_group_size=2, rows_per_file=3)


def write_100k(folder: Path, ratings=RATINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    lines = []
    for m, genres in MOVIES_100K.items():
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        lines.append(f"{m}|Caf\xe9 Film {m} (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{flags}")
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder / "u.data"


def expected_samples(ratings, first_genre: dict[int, str], click: float = 4, max_len: int = 3) -> dict:
    """Plain Python: per user ratings stably sorted by ts; history = ratings at earlier ts; leave-one-out."""
    users = {u: k + 1 for k, u in enumerate(sorted({r[0] for r in ratings}))}
    items = {i: k + 1 for k, i in enumerate(sorted({r[1] for r in ratings}))}
    names = sorted({first_genre[i] for i in items})
    cat = {i: names.index(first_genre[i]) + 1 for i in items}
    out = {"train": [], "valid": [], "test": []}
    for u in sorted(users):
        seq = sorted([r for r in ratings if r[0] == u], key=lambda r: r[3])
        for k, (_, i, r, t) in enumerate(seq):
            hist = [h for h in seq[:k] if h[3] < t][-max_len:]
            split = "test" if k == len(seq) - 1 else "valid" if k == len(seq) - 2 else "train"
            out[split].append({
                "user_id": users[u], "item_id": items[i], "item_category": cat[i],
                "hist_item_id": [items[h[1]] for h in hist], "hist_category": [cat[h[1]] for h in hist],
                "hist_behavior_type": [3 if h[2] >= click else 1 for h in hist],
                "hist_time_delta": [float(t - h[3]) for h in hist], "label": 1.0 if r >= click else 0.0,
            })
    return out


def first_100k(m: int) -> str:
    return next((g for g in GENRES if g in MOVIES_100K[m]), "(no genres listed)")


def rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def test_100k_values(tmp_path: Path) -> None:
    meta = convert(write_100k(tmp_path / "ml-100k"), tmp_path / "out", SMALL)
    assert meta["variant"] == "100k" and meta["sorted_input"] is False
    want = expected_samples(RATINGS, {m: first_100k(m) for m in MOVIES_100K})
    for split in ("train", "valid", "test"):
        assert rows(tmp_path / "out", split) == want[split], split
    assert [meta["splits"][s]["rows"] for s in ("train", "valid", "test")] == [6, 2, 2]
    assert meta["counts"]["rating_rows"] == 10 and meta["dropped"] == {}
    assert meta["category_names"] == ["(no genres listed)", "Action", "Animation", "Comedy", "Drama", "Sci-Fi"]
    assert meta["table_sizes"] == {"t_user_id": 3, "t_item_id": 7, "t_item_category": 7, "t_hist_behavior_type": 5}
    # one sample by hand: user 9's rating of item 3 at ts 520 (valid): history = the ratings before 520, the
    # last 3 (max_len): 4@400 (rated 1), then 1@500 (2) and 2@500 (5) in file order; label 1 (rating 4)
    v = [r for r in rows(tmp_path / "out", "valid") if r["user_id"] == 2][0]
    assert v["item_id"] == 3 and v["label"] == 1.0
    assert v["hist_item_id"] == [4, 1, 2] and v["hist_behavior_type"] == [1, 1, 3]
    assert v["hist_time_delta"] == [120.0, 20.0, 20.0]
    # ties: item 2 (ts 500, after item 1 at 500 in the file) does not see item 1 in its history
    tie = [r for r in rows(tmp_path / "out", "train") if r["user_id"] == 2 and r["item_id"] == 2][0]
    assert tie["hist_item_id"] == [4]


def test_1m_format_and_latin1(tmp_path: Path) -> None:
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    movies = {1: "Animation|Children's|Comedy", 2: "Action|Thriller", 3: "Drama", 4: "Comedy|Romance",
              5: "Documentary", 7: "Sci-Fi|War"}
    text = "".join(f"{m}::Am\xe9lie: {m} (2001)::{g}\n" for m, g in movies.items())  # ':' inside a title
    (d / "movies.dat").write_bytes(text.encode("latin-1"))
    meta = convert(d / "ratings.dat", tmp_path / "out", SMALL)
    assert meta["variant"] == "1m"
    want = expected_samples(RATINGS, {m: g.split("|")[0] for m, g in movies.items()})
    assert rows(tmp_path / "out", "train") == want["train"]
    assert meta["category_names"] == ["Action", "Animation", "Comedy", "Documentary", "Drama", "Sci-Fi"]


def write_latest(folder: Path, ratings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ratings))
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n1,"Toy Story, Part (1995)",Adventure|Animation\n2,Heat (1995),Action|Crime\n'
        '3,"Bébé, the (2000)",(no genres listed)\n4,Up (2009),Animation\n5,X (2001),Drama\n7,Y (1990),Sci-Fi\n',
        encoding="utf-8")
    return folder / "ratings.csv"


def test_latest_half_stars_and_threshold(tmp_path: Path) -> None:
    ratings = [(u, i, r - 0.5, t) for u, i, r, t in RATINGS]
    path = write_latest(tmp_path / "ml-latest-small", ratings)
    meta = convert(path, tmp_path / "out", replace(SMALL, click_rating=3.5))
    genre = {1: "Adventure", 2: "Action", 3: "(no genres listed)", 4: "Animation", 5: "Drama", 7: "Sci-Fi"}
    want = expected_samples(ratings, genre, click=3.5)
    for split in ("train", "valid", "test"):
        assert rows(tmp_path / "out", split) == want[split]
    assert meta["counts"]["clicks"] == sum(r[2] >= 3.5 for r in ratings) == 6


def test_latest_out_of_core_sort_is_exact(tmp_path: Path) -> None:
    """Synthetic: 600 ratings of 30 users grouped by user then movie (like ratings.csv), sorted in runs of 37
    rows from blocks of 1 KiB: the same output as one in-memory run."""
    ratings = [(u, m, 0.5 + (u * m) % 10 / 2, 1_000_000 + (u * 7919 + m * 104729) % 5000)
               for u in range(1, 31) for m in (1, 2, 3, 4, 5, 7) for _ in range(1)]
    ratings = sorted(ratings * 3, key=lambda r: (r[0], r[1]))
    ratings = [(u, m, r, t + k) for k, (u, m, r, t) in enumerate(ratings)]
    path = write_latest(tmp_path / "in", ratings)
    small = replace(SMALL, max_len=5, sort_rows=37, block_size=1024, events_per_group=50)
    meta = convert(path, tmp_path / "a", small)
    convert(path, tmp_path / "b", replace(small, sort_rows=1 << 20, block_size=1 << 20))
    assert meta["sorted_input"] is False
    genre = {1: "Adventure", 2: "Action", 3: "(no genres listed)", 4: "Animation", 5: "Drama", 7: "Sci-Fi"}
    want = expected_samples(ratings, genre, max_len=5)
    for split in ("train", "valid", "test"):
        assert rows(tmp_path / "a", split) == rows(tmp_path / "b", split) == want[split]


def test_detect_variant(tmp_path: Path) -> None:
    f = tmp_path / "r.txt"
    f.write_text("1::2::3::4\n")
    assert detect_variant(str(f)) == "1m"
    f.write_text("1\t2\t3\t4\n")
    assert detect_variant(str(f)) == "100k"
    f.write_text("userId,movieId,rating,timestamp\n")
    assert detect_variant(str(f)) == "latest"
    f.write_text("1,2,3,4\n")
    with pytest.raises(DataError, match=r"r\.txt: line 1: cannot tell the MovieLens variant"):
        detect_variant(str(f))


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    base = write_100k(tmp_path / "ml-100k")
    lines = base.read_text().splitlines()

    def variant_100k(k: int, text: str, name: str) -> str:
        d = tmp_path / name
        write_100k(d)
        new = list(lines)
        new[k] = text
        (d / "u.data").write_text("\n".join(new) + "\n")
        return str(d / "u.data")

    latest = write_latest(tmp_path / "latest", RATINGS)
    nohead = tmp_path / "nohead"
    write_latest(nohead, RATINGS)
    (nohead / "ratings.csv").write_text("1,2,3.0,4\n")
    one_colon = tmp_path / "colon"
    one_colon.mkdir()
    (one_colon / "ratings.dat").write_text("1::1::5::1\n1:1::5::2\n")
    (one_colon / "movies.dat").write_text("1::T (1)::Drama\n")
    return {
        "bad rating": (["--input", variant_100k(3, "2\t2\tx\t90", "r")],
                       r"u\.data: line 4, column 'rating': value 'x'; expected a rating"),
        "bad count": (["--input", variant_100k(6, "9\t4\t1", "c")],
                      r"u\.data: line 7: 3 fields .*expected 4 tab-separated fields"),
        "unknown movie": (["--input", variant_100k(1, "2\t99\t5\t100", "m")],
                          r"u\.data: line 2, column 'item': value '99'; expected a movie id of .*u\.item"),
        "missing header": (["--input", str(nohead / "ratings.csv")],
                           r"ratings\.csv: line 1: missing header .*expected a header naming userId,movieId,rating"),
        "no movies file": (["--input", str(latest), "--movies", str(tmp_path / "none.csv")],
                           r"none\.csv: no such file"),
        "1m separator": (["--input", str(one_colon / "ratings.dat")],
                         r"ratings\.dat: line 2: 6 fields .*expected UserID::MovieID::Rating::Timestamp"),
    }


@pytest.mark.parametrize("case", ["bad rating", "bad count", "unknown movie", "missing header", "no movies file",
                                  "1m separator"])
def test_cli_bad_input_is_one_line_exit_3_and_keeps_the_previous_output(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    good = write_100k(tmp_path / "good")
    assert main(["--input", str(good), "--out", str(out), "--max-len", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["rating_rows"] == 10
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    args, message = bad_cases(tmp_path)[case]
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and err.startswith("data error: "), err
    assert re.search(message, err), err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # earlier output intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_reader_reads_converted_data(tmp_path: Path) -> None:
    meta = convert(write_100k(tmp_path / "ml-100k"), tmp_path / "out", SMALL)
    cfg = DataConfig(schema=movielens_schema(meta), eval_paths=[str(tmp_path / "out" / "train" / "*.parquet")],
                     batch_size=4)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == meta["splits"]["train"]["rows"] == 6
    assert all(int(b.id_fixes.sum()) == 0 for b in batches)
