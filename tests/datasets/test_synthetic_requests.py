"""Tests of datasets.synthetic_requests (synthetic request-level data): layout, labels, planted set effects,
selection bias and exact propensities, determinism, the reader, the CLI and atomic output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from datasets.config import DataConfig
from datasets.meta import apply_table_sizes
from datasets.reader import eval_loader
from datasets.synthetic_requests import (
    SPLITS,
    RequestParams,
    RequestWorld,
    generate,
    main,
    request_arrow_schema,
    request_schema,
    set_features,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs/datasets/synthetic_requests_tiny.yaml"
BENCH_YAML = ROOT / "configs/datasets/synthetic_requests.yaml"
# The sizes of configs/datasets/synthetic_requests_tiny.yaml; big enough for the statistical tests (~68k
# training candidates), generated in well under a second.
TINY = RequestParams(
    num_requests=1500, num_valid=200, num_test=200, num_users=60, num_segments=4, num_items=2000,
    num_categories=40, num_clusters=8, min_candidates=30, max_candidates=60, max_history=30,
    exposed_per_request=5, files=2, row_group_size=250, seed=0,
)
CAND = ("cand_item_id", "cand_category", "cand_cross", "cand_propensity", "cand_stage", "cand_click",
        "cand_exposed", "cand_true_click")
HIST = ("hist_item_id", "hist_category")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("requests") / "out"
    return out, generate(out, TINY)


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """Flat numpy columns of a split: scalars ``[R]``, list columns flattened (``[E]`` history, ``[N]``
    candidates), ``hist_lengths`` / ``cand_lengths`` ``[R]`` for every list column's group."""
    cols: dict[str, list[np.ndarray]] = {}
    for path in sorted((out / split).glob("part-*.parquet")):
        t = pq.read_table(path)
        for name in t.column_names:
            arr = t[name].combine_chunks()
            if name.startswith(("hist_", "cand_")):
                cols.setdefault(name, []).append(arr.flatten().to_numpy())
                cols.setdefault(name + ".len", []).append(np.diff(arr.offsets.to_numpy()))
            else:
                cols.setdefault(name, []).append(arr.to_numpy())
    d = {k: np.concatenate(v) for k, v in cols.items()}
    d["hist_lengths"], d["cand_lengths"] = d["hist_item_id.len"], d["cand_item_id.len"]
    return d


def logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray, steps: int = 25) -> np.ndarray:
    """Maximum-likelihood logistic regression ``y ~ sigmoid(x @ w + offset)`` by Newton's method."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        prob = 1.0 / (1.0 + np.exp(-(x @ w + offset)))
        hess = x.T @ (x * (prob * (1 - prob))[:, None])
        w += np.linalg.solve(hess, x.T @ (y - prob))
    return w


def test_columns_types_and_group_lengths(data: tuple[Path, dict]) -> None:
    out, meta = data
    world = RequestWorld(TINY)
    for split in SPLITS:
        for path in sorted((out / split).glob("part-*.parquet")):
            assert pq.ParquetFile(path).schema_arrow.equals(request_arrow_schema())
        d = read_split(out, split)
        assert len(d["request_id"]) == meta["splits"][split]["requests"]
        for name in HIST:
            assert np.array_equal(d[name + ".len"], d["hist_lengths"]), name
        for name in CAND:
            assert np.array_equal(d[name + ".len"], d["cand_lengths"]), name
        assert d["hist_lengths"].min() >= 1 and d["hist_lengths"].max() <= TINY.max_history
        assert d["cand_lengths"].min() >= TINY.min_candidates and d["cand_lengths"].max() <= TINY.max_candidates
        assert d["hist_lengths"].max() > 3 * d["hist_lengths"].min()  # lengths vary
        for name, n in (("user_id", TINY.num_users), ("user_segment", TINY.num_segments),
                        ("hist_item_id", TINY.num_items), ("cand_item_id", TINY.num_items),
                        ("hist_category", TINY.num_categories), ("cand_category", TINY.num_categories)):
            assert d[name].min() >= 1 and d[name].max() <= n, name
        assert np.array_equal(d["cand_category"], world.item_cat[d["cand_item_id"]])
        assert np.array_equal(d["hist_category"], world.item_cat[d["hist_item_id"]])
        assert np.array_equal(d["user_segment"], world.user_segment[d["user_id"]])
        # no item twice in one request
        crow = np.repeat(np.arange(len(d["cand_lengths"])), d["cand_lengths"])
        key = crow * (TINY.num_items + 1) + d["cand_item_id"]
        assert len(np.unique(key)) == len(key)
        for name in ("cand_click", "cand_exposed", "cand_true_click"):
            assert set(np.unique(d[name]).tolist()) == {0.0, 1.0}, name
        assert np.array_equal(d["cand_click"], d["cand_exposed"] * d["cand_true_click"])


def test_request_ids_unique_over_splits_and_meta_counts(data: tuple[Path, dict]) -> None:
    out, meta = data
    ids = np.concatenate([read_split(out, s)["request_id"] for s in SPLITS])
    assert np.array_equal(ids, np.arange(1, TINY.num_requests + TINY.num_valid + TINY.num_test + 1))
    users = [set(read_split(out, s)["user_id"].tolist()) for s in SPLITS]
    assert users[0] & users[1] and users[0] & users[2]  # users recur across splits
    for split in SPLITS:
        d, s = read_split(out, split), meta["splits"][split]
        assert s["candidates"] == len(d["cand_item_id"]) and s["exposed"] == int(d["cand_exposed"].sum())
        assert s["clicks"] == int(d["cand_click"].sum()) and s["true_clicks"] == int(d["cand_true_click"].sum())
        assert s["observed_ctr"] == pytest.approx(d["cand_click"].sum() / d["cand_exposed"].sum())
        assert s["true_ctr"] == pytest.approx(d["cand_true_click"].mean())
    assert meta["synthetic"] is True and json.loads((out / "meta.json").read_text()) == meta
    assert meta["table_sizes"] == {"t_user_id": 61, "t_user_segment": 5, "t_item_id": 2001, "t_item_category": 41,
                                   "t_cand_cross": 9}


def test_cross_feature_matches_its_definition(data: tuple[Path, dict]) -> None:
    d = read_split(data[0], "train")
    hrow = np.repeat(np.arange(len(d["hist_lengths"])), d["hist_lengths"])
    crow = np.repeat(np.arange(len(d["cand_lengths"])), d["cand_lengths"])
    counts = {(int(r), int(c)): 0 for r, c in zip(crow[:3000], d["cand_category"][:3000])}
    for r, c in zip(hrow, d["hist_category"]):
        if (int(r), int(c)) in counts:
            counts[int(r), int(c)] += 1
    for i in range(3000):
        n = counts[int(crow[i]), int(d["cand_category"][i])]
        assert d["cand_cross"][i] == 1 + min(7, int(np.floor(np.log2(1 + n)))), i
    assert d["cand_cross"].min() == 1 and d["cand_cross"].max() >= 4 and d["cand_cross"].max() <= 8


def test_propensities_are_the_exposure_probabilities(data: tuple[Path, dict]) -> None:
    d = read_split(data[0], "train")
    p, e = d["cand_propensity"].astype(np.float64), d["cand_exposed"]
    assert p.min() >= TINY.p_min - 1e-7 and p.max() <= 1.0
    assert (p <= TINY.p_min + 1e-6).mean() > 0.1 and p.max() > 0.8  # a wide range, clipped at p_min
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bucket = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bucket == b
        if sel.sum() < 500:
            continue
        want, got = p[sel].mean(), e[sel].mean()
        se = np.sqrt(want * (1 - want) / sel.sum())
        assert abs(got - want) < 4 * se + 0.003, (b, got, want)
    per_request = e.sum() / len(d["cand_lengths"])
    assert per_request == pytest.approx(TINY.exposed_per_request, rel=0.1)
    # the funnel stage: 5 exactly where exposed; unexposed 1..4, a higher stage never has a lower propensity
    stage = d["cand_stage"]
    assert np.array_equal(stage == 5, e == 1) and set(np.unique(stage[e == 0]).tolist()) == {1.0, 2.0, 3.0, 4.0}
    crow = np.repeat(np.arange(len(d["cand_lengths"])), d["cand_lengths"])
    unexp = e == 0
    lo = np.full((len(d["cand_lengths"]), 6), np.inf)
    hi = np.full((len(d["cand_lengths"]), 6), -np.inf)
    np.minimum.at(lo, (crow[unexp], stage[unexp].astype(int)), p[unexp])
    np.maximum.at(hi, (crow[unexp], stage[unexp].astype(int)), p[unexp])
    for s in (1, 2, 3):
        ok = np.isfinite(hi[:, s]) & np.isfinite(lo[:, s + 1])
        assert (hi[ok, s] <= lo[ok, s + 1] + 1e-7).all(), s


def test_set_effects_are_planted(data: tuple[Path, dict]) -> None:
    out, meta = data
    world, p = RequestWorld(TINY), TINY.resolved()
    d = read_split(out, "train")
    f = set_features(world, p, d["hist_lengths"], d["hist_category"], d["cand_lengths"], d["cand_item_id"])
    y = d["cand_true_click"].astype(np.float64)
    # refit the true click model on all candidates (item quality as a known offset): the set terms' weights come back
    x = np.stack([np.ones_like(y), f["affinity"], f["f_comp"], f["f_dup"]], axis=1)
    w = logistic_fit(x, y, world.item_quality[d["cand_item_id"]])
    assert w[0] == pytest.approx(meta["calibration"]["true_bias"], abs=0.15)
    assert w[1] == pytest.approx(p.affinity_weight, rel=0.15)
    assert w[2] == pytest.approx(p.complement_weight, rel=0.15)
    assert w[3] == pytest.approx(-p.duplicate_weight, rel=0.2)
    # groups: among candidates without affinity, more of the complementary category -> more clicks, and
    # near-duplicates in the set -> fewer
    none = f["affinity"] == 0
    comp_hi, comp_0 = none & (f["f_comp"] >= 0.05), none & (f["f_comp"] == 0)
    assert y[comp_hi].mean() > 1.5 * y[comp_0].mean(), (y[comp_hi].mean(), y[comp_0].mean())
    dup, nodup = none & (f["f_dup"] >= 0.03) & (f["f_comp"] == 0), none & (f["f_dup"] == 0) & (f["f_comp"] == 0)
    assert y[dup].mean() < 0.8 * y[nodup].mean(), (y[dup].mean(), y[nodup].mean())
    # the same item in different sets: the set terms vary within an item (a pointwise model cannot see them)
    item = d["cand_item_id"]
    spread = np.bincount(item, weights=f["set_logit"] ** 2) / np.maximum(np.bincount(item), 1)
    spread -= (np.bincount(item, weights=f["set_logit"]) / np.maximum(np.bincount(item), 1)) ** 2
    assert np.average(spread, weights=np.bincount(item)) > 0.5 * f["set_logit"].var()
    s = meta["set_effects"]
    assert s["auc_true_logit"] > s["auc_without_set_terms"] + 0.05, s
    assert s["auc_without_complement"] < s["auc_true_logit"] and s["auc_without_duplicates"] < s["auc_true_logit"]


def test_selection_bias_and_ips(data: tuple[Path, dict]) -> None:
    out, meta = data
    d = read_split(out, "train")
    e, t, p = d["cand_exposed"] == 1, d["cand_true_click"], d["cand_propensity"].astype(np.float64)
    true_ctr, observed = t.mean(), d["cand_click"][e].mean()
    assert true_ctr == pytest.approx(TINY.target_true_ctr, abs=0.015)
    assert observed - true_ctr > 0.03, (observed, true_ctr)  # the exposed space is a biased sample
    assert t[e].mean() - t[~e].mean() > 0.03
    world = RequestWorld(TINY)
    zpop = world.item_zpop[d["cand_item_id"]]
    assert zpop[e].mean() - zpop.mean() > 0.5  # the policy exposes popular items
    # inverse-propensity weighting of the observed clicks recovers the true CTR of the whole candidate space
    terms = d["cand_click"] / p
    ips, se = terms.mean(), terms.std() / np.sqrt(len(terms))
    assert abs(ips - true_ctr) < 4 * se, (ips, true_ctr, se)
    assert abs(observed - true_ctr) > 4 * se
    assert meta["splits"]["train"]["ips_true_ctr"] == pytest.approx(ips)


def test_deterministic_with_seed(tmp_path: Path) -> None:
    small = replace(TINY, num_requests=120, num_valid=30, num_test=30, row_group_size=50)
    generate(tmp_path / "a", small)
    generate(tmp_path / "b", small)
    generate(tmp_path / "c", replace(small, seed=1))
    for split in SPLITS:
        a, b, c = (read_split(tmp_path / x, split) for x in "abc")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["cand_true_click"][:500], c["cand_true_click"][:500])
    assert json.loads((tmp_path / "a/meta.json").read_text()) == json.loads((tmp_path / "b/meta.json").read_text())


def _data_config(path: Path, **overrides: object) -> DataConfig:
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path).data, overrides)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig)
    return cfg


def test_yaml_schemas_match_the_generator(data: tuple[Path, dict]) -> None:
    out, meta = data
    tiny = _data_config(TINY_YAML).schema
    tiny.validate()
    assert tiny == request_schema(TINY.num_users, TINY.num_segments, TINY.num_items, TINY.num_categories)
    bench = _data_config(BENCH_YAML)
    assert bench.meta_path and [f.num_embeddings for f in bench.schema.id_features] == [0] * 7
    filled = apply_table_sizes(bench.schema, out / "meta.json")  # the benchmark yaml takes its sizes from meta.json
    filled.validate()
    assert filled == tiny and filled.table_sizes() == meta["table_sizes"]
    d = RequestParams()
    assert (d.num_requests, d.num_valid, d.num_test, d.min_candidates, d.max_candidates, d.max_history) == (
        20000, 3000, 3000, 200, 200, 100)  # what configs/datasets/synthetic_requests.yaml documents


def test_reader_gives_the_three_sequence_labels(data: tuple[Path, dict]) -> None:
    out, _ = data
    cfg = _data_config(TINY_YAML, eval_paths=[str(out / "valid" / "*.parquet")], batch_size=16)
    batches = list(eval_loader(cfg, 0, 1))
    assert sum(int(b.valid.sum()) for b in batches) == TINY.num_valid
    d = read_split(out, "valid")
    b = batches[0]
    assert b.sequence_labels.keys() == ["cand_click", "cand_exposed", "cand_true_click"]
    assert b.float_sequences.keys() == ["cand_propensity", "cand_stage"]
    assert b.labels.shape == (16, 0)
    n = int(d["cand_lengths"][:16].sum())
    assert b.sequence_labels["cand_click"].lengths().tolist() == d["cand_lengths"][:16].tolist()
    for name in ("cand_click", "cand_exposed", "cand_true_click"):
        assert b.sequence_labels[name].values().tolist() == d[name][:n].tolist(), name
    assert b.float_sequences["cand_propensity"].values().numpy().tolist() == d["cand_propensity"][:n].tolist()
    assert b.sparse_features["cand_cross"].values().tolist() == d["cand_cross"][:n].tolist()
    assert b.sparse_features["hist_item_id"].lengths().tolist() == d["hist_lengths"][:16].tolist()
    assert b.group_ids.tolist() == d["request_id"][:16].tolist()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--out", str(tmp_path / "out"), "--num-requests", "60", "--num-valid", "10", "--num-test", "10",
                 "--num-users", "20", "--num-items", "500", "--num-categories", "20", "--num-clusters", "4",
                 "--min-candidates", "10", "--max-candidates", "20", "--max-history", "15",
                 "--exposed-per-request", "3", "--files", "2", "--row-group-size", "25", "--seed", "3"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["table_sizes"] == meta["table_sizes"] and printed["table_sizes"]["t_item_id"] == 501
    assert meta["params"]["seed"] == 3 and meta["params"]["max_history"] == 15
    assert [meta["splits"][s]["requests"] for s in SPLITS] == [60, 10, 10]
    assert meta["splits"]["valid"]["first_request_id"] == 61 and meta["splits"]["test"]["first_request_id"] == 71
    parts = sorted((tmp_path / "out" / "train").glob("part-*.parquet"))
    sizes = [[pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).num_row_groups)]
             for f in parts]
    assert sizes == [[25, 25], [10]]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for bad, message in ((["--num-requests", "0"], "num_requests >= 1"),
                         (["--min-candidates", "50", "--max-candidates", "40"], "min_candidates <= max_candidates"),
                         (["--num-users", "many"], "--num-users")):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "a"), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path), "--num-requests", "10", "--num-valid", "2", "--num-test", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("output error: ") and "notes.txt" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


class FailAfterFirstFile:
    """Stands in for pq.ParquetWriter: the first file is written, opening the second raises."""

    real = pq.ParquetWriter
    opened = 0

    def __new__(cls, *args, **kwargs):
        FailAfterFirstFile.opened += 1
        if FailAfterFirstFile.opened > 1:
            raise RuntimeError("disk on fire")
        return cls.real(*args, **kwargs)


def test_failed_generation_keeps_the_previous_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = replace(TINY, num_requests=100, num_valid=20, num_test=20, row_group_size=40)
    out = tmp_path / "out"
    meta = generate(out, small)
    before = {s: read_split(out, s) for s in SPLITS}
    FailAfterFirstFile.opened = 0
    monkeypatch.setattr(pq, "ParquetWriter", FailAfterFirstFile)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(out, replace(small, seed=5))
    assert FailAfterFirstFile.opened == 2  # it did fail mid-way
    monkeypatch.undo()
    assert json.loads((out / "meta.json").read_text()) == meta
    for split, cols in before.items():
        after = read_split(out, split)
        assert after.keys() == cols.keys() and all(np.array_equal(after[k], cols[k]) for k in cols)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder is gone
    assert generate(out, replace(small, seed=5))["params"]["seed"] == 5  # a successful run replaces it
