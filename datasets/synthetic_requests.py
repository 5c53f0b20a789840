"""Synthetic REQUEST-LEVEL pre-ranking data with set effects and selection bias (labelled synthetic everywhere).

One parquet row is one request of a pre-ranking stage: the user, the user's behaviour history and the whole
candidate set the retrieval stage returned, every candidate labelled with its TRUE click (drawn for exposed
and unexposed candidates alike), whether a biased logging policy exposed it, and the observed click. It is
the entire-space setting of DUET (Xiao et al., "DUET: Dual Model Co-Training for Entire Space CTR
Prediction"): the true click of a candidate depends on the other candidates of its set (so that a
candidate-to-candidate attention over the set can learn what a pointwise model cannot), and training labels
exist only where the logging policy exposed (sample selection bias). Generation is vectorised with numpy, one
row group at a time, and what was planted is recorded in ``meta.json``.

Columns (one row per request; ``list`` columns unpadded)

=====================  ==================  ===========================================================
column                 arrow type          meaning
=====================  ==================  ===========================================================
request_id             int64               unique over all splits (the ranking metrics' group)
user_id                int64               ids from 1
user_segment           int64               1 + (the user's first interest cluster mod num_segments)
hist_item_id           list<int64>         group ``history``: behaviours, oldest first, 1..max_history
hist_category          list<int64>         the behaviours' categories
cand_item_id           list<int64>         group ``candidates``: m in [min_candidates, max_candidates]
cand_category          list<int64>         the candidates' categories
cand_cross             list<int64>         1 + min(7, floor(log2(1 + n_hist_cat))), 1..8 (table size 9)
cand_propensity        list<float32>       the logging policy's exposure probability, in [p_min, 1]
cand_stage             list<float32>       5 exposed; unexposed 4/3/2/1 by policy-score quartile
cand_click             list<float32>       observed click = cand_exposed * cand_true_click
cand_exposed           list<float32>       1 if the logging policy exposed the candidate
cand_true_click        list<float32>       the true click of EVERY candidate (exposed or not)
=====================  ==================  ===========================================================

``n_hist_cat`` is the number of the request's behaviours in the candidate's category. Items and categories
share tables between history and candidates (``t_item_id``, ``t_item_category``); id 0 is padding, table
sizes are counts + 1 (``t_cand_cross``: 9). No scalar label columns.

The world (fixed by ``seed``)
    * ``num_categories`` categories fall into ``num_clusters`` clusters (round robin, shuffled).
    * Complement pairing: the categories, in a random order, are paired (1st with 2nd, 3rd with 4th, ...);
      ``complement(c)`` is c's partner (an odd count maps the last category to the first, one way).
    * Every item has one category and one of ``num_subclusters`` sub-clusters; its near-duplicate group
      is ``(category, sub-cluster)``. Every group holds at least one item.
    * Items have Zipf popularity ``pop ∝ rank ** -zipf_exponent`` (ranks shuffled) and a quality
      ``q ~ N(0, quality_scale)`` independent of popularity. ``zpop`` is log-popularity standardised.
    * Every user has 1..``max_interests`` distinct interest clusters.

A request (users drawn uniformly, so users recur across requests and splits)
    * History: length lognormal (median ``history_median``, log-sd ``history_sigma``) clipped to
      ``[1, max_history]``; each behaviour is, with probability ``interest_rate``, an item of one of the
      user's clusters (popularity-weighted within the cluster), else an item drawn by global popularity.
    * Candidates (the retrieval stage): ``m`` uniform in ``[min_candidates, max_candidates]``. The request
      draws its own complement share ``s_comp ~ U(0, 2 * retrieval_complement)`` and near-duplicate share
      ``s_dup ~ U(0, 2 * retrieval_duplicate)``; each slot independently is an *interest* item (probability
      ``retrieval_interest``, as for the history), a *complement* item (``s_comp``: an item, by popularity,
      of ``complement(category(a))`` for ``a`` a random interest slot of the request), a *near-duplicate*
      (``s_dup``: an item, by popularity, of the near-duplicate group of such an ``a``) or a *popular* item
      (the rest, global popularity; also a complement or near-duplicate slot of a request without interest
      slots). Repeated items within a request are replaced by uniformly random items (no item
      appears twice in a request). The order of the candidates is random.

True click model (with set effects), for candidate i of a request with history H and candidate set S
    ``affinity_i = (n_H(cat_i) + related_weight * (n_H(cluster_i) - n_H(cat_i))) / |H|`` (share of the
    history in the candidate's category, plus ``related_weight`` times the share in the other categories
    of its cluster), ``f_comp_i = |{j in S, j != i: cat_j = complement(cat_i)}| / (m - 1)`` (complement
    lift: fraction of the rest of the set in the complementary category), ``f_dup_i = |{j in S, j != i:
    group_j = group_i}| / (m - 1)`` (near-duplicate suppression), and

        logit_i = affinity_weight * affinity_i + q_i + complement_weight * f_comp_i
                  - duplicate_weight * f_dup_i + bias,     true_click_i ~ Bernoulli(sigmoid(logit_i)),

    ``bias`` bisected on a pilot sample so that the mean click probability is ``target_true_ctr``. The set
    terms depend on the whole candidate set of the request, not on the exposed items only.

Logging policy (biased exposure)
    ``policy_i = popularity_weight * zpop_i + policy_affinity_weight * affinity_i + eps_i + policy_bias``,
    ``eps_i ~ N(0, policy_noise)``, ``p_i = clip(sigmoid(policy_i), p_min, 1)``, exposed_i ~ Bernoulli(p_i)
    independently; ``policy_bias`` bisected on the pilot so that ``E[sum_i p_i] = exposed_per_request``. The
    policy ignores quality and set effects, so exposed candidates are a biased sample (popular, in-interest
    items), while ``cand_propensity = p_i`` makes inverse-propensity weighting exactly unbiased:
    ``E[sum_i cand_click_i / p_i] = E[sum_i true_click_i]`` (the exposure draw is independent of the click
    draw given the request). ``cand_stage`` mimics RecFlow's funnel:
    5 for exposed, and for the request's unexposed candidates ``1 + floor(4 * rank / n_unexposed)`` with
    ``rank`` 0-based by ascending ``policy_i`` (4 = went furthest).

Defaults (:class:`RequestParams`, the benchmark size of ``configs/datasets/synthetic_requests.yaml``)
    20000 / 3000 / 3000 requests, 5000 users, 20000 items, 200 categories in 40 clusters, 4 sub-clusters,
    200 candidates, histories up to 100 (median 33), ``interest_rate`` 0.8, retrieval shares 0.4 / 0.1 /
    0.1, ``related_weight`` 0.3, ``affinity_weight`` 5, ``quality_scale`` 0.5, ``complement_weight`` 40,
    ``duplicate_weight`` 80, ``target_true_ctr`` 0.1, ``popularity_weight`` 1, ``policy_affinity_weight``
    8, ``policy_noise`` 0.8, ``p_min`` 0.005, 20 exposed per request. With seed 0 (train split): exposure
    rate 0.100, true CTR 0.101, observed CTR (among exposed) 0.138, true CTR of the unexposed 0.097, IPS
    estimate 0.099; on the pilot the AUC of the true logit over all candidates is 0.737, 0.680 without the
    set terms (0.685 without the complement term, 0.719 without the near-duplicate term).

Splits ``train``, ``valid``, ``test`` are drawn from the same process with independent random streams
(``[seed, split, file, row group]``); request ids run on across them (train from 1, then valid, then test).
``meta.json`` records the resolved parameters, the calibration, the complement pairing, per-split summary
statistics (exposure rate, true CTR, observed CTR among exposed, true CTR of exposed and unexposed
candidates, the IPS estimate of the true CTR) and, on a pilot sample, how strong the set effects are (AUC of
the true logit with and without the set terms over all candidates, against the true clicks).

Modules: this one labels the drawn requests (true clicks, exposure, stages) and writes them (the schemas,
:func:`generate`, the CLI); :mod:`datasets.synthetic_requests_world` holds the parameters and the world
(:class:`RequestParams`, :class:`RequestWorld`), :mod:`datasets.synthetic_requests_clicks` the drawing of
requests, the true click model's terms (:func:`set_features`), the logging policy and the calibration.

CLI::

    python -m datasets.synthetic_requests --out DIR [--num-requests N] [--num-valid N] [--num-test N]
        [--num-users U] [--num-items I] [--num-categories C] [--num-clusters K] [--min-candidates M]
        [--max-candidates M] [--max-history L] [--exposed-per-request E] [--target-true-ctr P]
        [--files F] [--row-group-size R] [--seed S]

writes ``DIR/{train,valid,test}/part-*.parquet`` and ``DIR/meta.json`` (``table_sizes`` in it is what
``data.meta_path`` reads). ``DIR`` is written into a temporary folder beside it and swapped in at the end
(:mod:`datasets.convert_io`): a failed or killed run leaves a previous ``DIR`` complete. Exit 0; 2 bad
arguments or a ``DIR`` that is not a previous output, 1 a write error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets.convert_io import run_converter, staged_output
from datasets.schema import FloatFeature, IdFeature, SchemaConfig
from datasets.synthetic_requests_clicks import (
    CROSS_LEVELS,
    _SPLIT_SEED,
    _calibrate,
    _draw,
    _offsets,
    _propensity,
    _sigmoid,
    set_features,
)
from datasets.synthetic_requests_world import RequestParams, RequestWorld

__all__ = [
    "RequestParams",
    "RequestWorld",
    "SPLITS",
    "generate",
    "main",
    "request_arrow_schema",
    "request_schema",
    "set_features",
]

#: Split folders, in request-id order.
SPLITS = ("train", "valid", "test")
#: What an output folder holds (anything else makes :func:`generate` refuse to replace it).
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in SPLITS}}


def request_arrow_schema() -> pa.Schema:
    """The arrow schema :func:`generate` writes (see the module docstring's table)."""
    i64, f32 = pa.int64(), pa.float32()
    columns = [("request_id", i64), ("user_id", i64), ("user_segment", i64)]
    ints = ("hist_item_id", "hist_category", "cand_item_id", "cand_category", "cand_cross")
    floats = ("cand_propensity", "cand_stage", "cand_click", "cand_exposed", "cand_true_click")
    columns += [(n, pa.list_(i64)) for n in ints] + [(n, pa.list_(f32)) for n in floats]
    return pa.schema([pa.field(n, t, nullable=False) for n, t in columns])


def request_schema(num_users: int, num_segments: int, num_items: int, num_categories: int) -> SchemaConfig:
    """The :class:`SchemaConfig` of data written by :func:`generate` (and of the RecFlow converter's columns).

    Args:
        num_users: real user ids ``1..num_users`` (table ``t_user_id`` has ``num_users + 1`` rows).
        num_segments: real segments.
        num_items: real item ids (``t_item_id``, shared by ``hist_item_id`` and ``cand_item_id``).
        num_categories: real categories (``t_item_category``, shared by ``hist_category`` and ``cand_category``).

    Returns:
        Id features ``user_id``, ``user_segment``, ``hist_item_id``, ``hist_category`` (group ``history``),
        ``cand_item_id``, ``cand_category``, ``cand_cross`` (group ``candidates``); float sequences
        ``cand_propensity``, ``cand_stage``; sequence labels ``cand_click``, ``cand_exposed``,
        ``cand_true_click``; no scalar labels; group column ``request_id``.
    """
    cand = "candidates"
    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id", num_users + 1),
            IdFeature("user_segment", num_segments + 1),
            IdFeature("hist_item_id", num_items + 1, sequence=True, table="item_id"),
            IdFeature("hist_category", num_categories + 1, sequence=True, table="item_category"),
            IdFeature("cand_item_id", num_items + 1, sequence=True, table="item_id", group=cand),
            IdFeature("cand_category", num_categories + 1, sequence=True, table="item_category", group=cand),
            IdFeature("cand_cross", CROSS_LEVELS + 1, sequence=True, group=cand),
        ],
        float_features=[FloatFeature("cand_propensity", True, cand), FloatFeature("cand_stage", True, cand)],
        labels=[],
        sequence_labels=[FloatFeature(n, True, cand) for n in ("cand_click", "cand_exposed", "cand_true_click")],
        group_column="request_id",
    )
    schema.validate()
    return schema


def _list(lengths: np.ndarray, values: np.ndarray, t: pa.DataType) -> pa.ListArray:
    off = pa.array(_offsets(lengths).astype(np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(off, pa.array(np.ascontiguousarray(values).astype(t.to_pandas_dtype(), copy=False)))


def _label(world: RequestWorld, p: RequestParams, cal: dict, d: dict, first_id: int) -> tuple[pa.Table, dict]:
    """Labels drawn requests: true clicks, exposure, stages; returns the table and its counts."""
    n = len(d["users"])
    m, crow = d["cand_lengths"], np.repeat(np.arange(n), d["cand_lengths"])
    true_click = d["u_click"] < _sigmoid(d["pointwise_logit"] + d["set_logit"] + cal["true_bias"])
    prop = _propensity(d["policy_logit"], cal["policy_bias"], p.p_min)
    exposed = d["u_expose"] < prop
    click = exposed & true_click
    stage = np.full(len(crow), 5.0)
    unexposed = np.flatnonzero(~exposed)
    order = np.lexsort((d["policy_logit"][unexposed], crow[unexposed]))
    idx = unexposed[order]  # grouped by request, ascending policy score
    r = crow[idx]
    rank = np.arange(len(idx)) - np.searchsorted(r, r, side="left")
    stage[idx] = 1 + np.floor(4 * rank / np.bincount(r, minlength=n)[r])
    hl = d["hist_lengths"]
    i64, f32 = pa.int64(), pa.float32()
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
            pa.array(d["users"].astype(np.int64)),
            pa.array(world.user_segment[d["users"]].astype(np.int64)),
            _list(hl, d["hist_item_id"], i64),
            _list(hl, world.item_cat[d["hist_item_id"]], i64),
            _list(m, d["cand_item_id"], i64),
            _list(m, world.item_cat[d["cand_item_id"]], i64),
            _list(m, d["cross"], i64),
            _list(m, prop, f32),
            _list(m, stage, f32),
            _list(m, click, f32),
            _list(m, exposed, f32),
            _list(m, true_click, f32),
        ],
        schema=request_arrow_schema(),
    )
    counts = {
        "requests": n,
        "candidates": int(len(crow)),
        "behaviours": int(hl.sum()),
        "exposed": int(exposed.sum()),
        "clicks": int(click.sum()),
        "true_clicks": int(true_click.sum()),
        "true_clicks_exposed": int((true_click & exposed).sum()),
        "propensity_sum": float(prop.sum()),
        "ips_clicks": float((click / prop).sum()),
        "requests_without_exposure": int((np.bincount(crow, weights=exposed, minlength=n) == 0).sum()),
        "requests_without_click": int((np.bincount(crow, weights=click, minlength=n) == 0).sum()),
    }
    return table, counts


def _summary(c: dict, files: int, first_id: int) -> dict:
    n_unexp = c["candidates"] - c["exposed"]
    out = dict(c)
    out.update(
        files=files,
        first_request_id=first_id,
        mean_candidates=c["candidates"] / c["requests"],
        mean_history=c["behaviours"] / c["requests"],
        exposed_per_request=c["exposed"] / c["requests"],
        exposure_rate=c["exposed"] / c["candidates"],
        mean_propensity=c["propensity_sum"] / c["candidates"],
        true_ctr=c["true_clicks"] / c["candidates"],
        observed_ctr=c["clicks"] / max(c["exposed"], 1),
        click_rate_all=c["clicks"] / c["candidates"],
        true_ctr_exposed=c["true_clicks_exposed"] / max(c["exposed"], 1),
        true_ctr_unexposed=(c["true_clicks"] - c["true_clicks_exposed"]) / max(n_unexp, 1),
        ips_true_ctr=c["ips_clicks"] / c["candidates"],
    )
    return out


def _write_split(
    world: RequestWorld, p: RequestParams, cal: dict, out: Path, split: str, rows: int, first_id: int
) -> dict:
    """Writes one split file by file, row group by row group; returns its summary statistics."""
    out.mkdir(parents=True)
    groups = math.ceil(rows / p.row_group_size)
    files = min(p.files, groups)
    per_file = [(groups // files + (1 if i < groups % files else 0)) for i in range(files)]
    totals: dict = {}
    next_id, left = first_id, rows
    for f, n_groups in enumerate(per_file):
        with pq.ParquetWriter(out / f"part-{f:05d}.parquet", request_arrow_schema(), compression="snappy") as writer:
            for g in range(n_groups):
                n = min(p.row_group_size, left)
                rng = np.random.default_rng([p.seed, _SPLIT_SEED[split], f, g])
                table, counts = _label(world, p, cal, _draw(world, p, n, rng), next_id)
                writer.write_table(table, row_group_size=n)
                for key, v in counts.items():
                    totals[key] = totals.get(key, 0) + v
                next_id += n
                left -= n
    return _summary(totals, files, first_id)


def generate(out_dir: str | Path, params: RequestParams) -> dict:
    """Writes ``out_dir/{train,valid,test}/part-*.parquet`` and ``out_dir/meta.json``; returns the meta dict.

    ``out_dir`` is replaced as a whole, and only once the new data is complete
    (:func:`datasets.convert_io.staged_output`).

    Args:
        out_dir: output folder: new, empty, or a previous output (nothing but ``meta.json`` and the split
            folders of ``part-*.parquet``).
        params: sizes, seed and planted structure.

    Returns:
        The meta: ``synthetic: True``, ``params`` (resolved), ``calibration`` (``true_bias``,
        ``policy_bias``), ``complement`` (category -> complementary category, index 0 padding),
        ``set_effects`` (pilot statistics), ``num_ids``, ``table_sizes`` (``t_*`` -> rows), ``splits``
        (summary statistics per split).

    Raises:
        ValueError: invalid ``params``.
        OutputError: ``out_dir`` holds something other than a previous output.
    """
    p = params.resolved()
    with staged_output(out_dir, _OUTPUT_ENTRIES) as out:
        world = RequestWorld(p)
        cal, set_stats = _calibrate(world, p)
        splits, first = {}, 1
        for split, rows in zip(SPLITS, (p.num_requests, p.num_valid, p.num_test)):
            splits[split] = _write_split(world, p, cal, out / split, split, rows, first)
            first += rows
        schema = request_schema(p.num_users, p.num_segments, p.num_items, p.num_categories)
        meta = {
            "synthetic": True,
            "generator": "datasets.synthetic_requests",
            "params": asdict(p),
            "calibration": cal,
            "complement": world.complement.tolist(),
            "set_effects": set_stats,
            "num_ids": {"user_id": p.num_users, "user_segment": p.num_segments, "item_id": p.num_items,
                        "item_category": p.num_categories, "cand_cross": CROSS_LEVELS},
            "table_sizes": schema.table_sizes(),
            "splits": splits,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code (bad arguments: SystemExit(2))."""
    d = RequestParams()
    ap = _Parser(prog="python -m datasets.synthetic_requests", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous output; replaced)")
    flags = [
        ("num_requests", int), ("num_valid", int), ("num_test", int), ("num_users", int), ("num_items", int),
        ("num_categories", int), ("num_clusters", int), ("min_candidates", int), ("max_candidates", int),
        ("max_history", int), ("exposed_per_request", float), ("target_true_ctr", float), ("files", int),
        ("row_group_size", int), ("seed", int),
    ]
    for name, t in flags:
        default = getattr(d, name)
        ap.add_argument("--" + name.replace("_", "-"), type=t, default=default,
                        help=f"default {default}" if default is not None else "default: see the module docstring")
    a = ap.parse_args(argv)
    params = RequestParams(**{name: getattr(a, name) for name, _ in flags})
    try:
        params.resolved()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: generate(a.out, params), a.out)
    if meta is None:
        return code
    keys = ("requests", "exposure_rate", "true_ctr", "observed_ctr", "true_ctr_exposed", "true_ctr_unexposed",
            "ips_true_ctr")
    summary = {s: {k: meta["splits"][s][k] for k in keys} for s in SPLITS}
    print(json.dumps({"out": a.out, "splits": summary, "set_effects": meta["set_effects"],
                      "table_sizes": meta["table_sizes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
