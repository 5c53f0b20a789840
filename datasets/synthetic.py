"""Synthetic long-sequence CTR data with planted, known structure (labelled synthetic everywhere).

The generator writes the canonical table (:mod:`datasets.canonical`) at any size, vectorised with numpy,
one row group at a time (never more than one row group in memory), and records what it planted in
``meta.json``. The structure is chosen so that reading the whole history pays off:

* Categories fall into ``num_clusters`` clusters of related categories. ``relatedness(c, c') = 1`` when
  ``c = c'``, ``related_weight`` when ``c`` and ``c'`` share a cluster, else 0.
* Items have Zipf popularity (exponent ``zipf_exponent``) and one category each.
* History lengths are lognormal (median ``length_median``, log-sd ``length_sigma``), clipped to
  ``[1, max_seq_len]``: heavy-tailed, ``max >> median``.
* Every user has 1..``max_interests`` long-term interest clusters. Each behaviour is, independently and
  wherever it sits in the history, an interest behaviour with probability ``interest_rate`` (an item of
  one of the user's clusters, popularity-weighted within the cluster) or popular noise otherwise (an
  item drawn from global popularity). Interest behaviours are therefore spread uniformly over the whole
  history, and the last 50 behaviours see only a small share of them.
* Behaviour types (1 pv, 2 cart, 3 fav, 4 buy; a user-item cross feature) are more often 2..4 for
  interest behaviours.
* ``hist_time_delta``: gaps between consecutive behaviours (and between the last one and the request)
  are exponential with mean ``mean_gap_s``; the delta is the time from the behaviour to the request, so
  it decreases along the (oldest-first) list (non-increasing after rounding to float32).
* ``hist_relevance_j = relatedness(category_j, target category) * exp(-time_delta_j / tau_s)`` with
  ``tau_s`` (default ``max_seq_len * mean_gap_s``) long enough that the oldest behaviours still count.
* ``P(click) = sigmoid(slope * log1p(sum_j relevance_j) + bias + short_term)``, ``short_term`` being the
  sum of the last ``short_term_k`` behaviours' per-item random effects (std ``short_term_scale``).
  ``bias`` is calibrated on a pilot sample so that the positive rate is ``target_positive_rate``.
* The target is an item of one of the user's clusters with probability ``target_interest_rate``, else a
  popular item.

CLI::

    python -m datasets.synthetic --out DIR --num-samples N [--num-eval-samples N] [--num-users U]
        [--num-items I] [--num-categories C] [--max-seq-len L] [--files F] [--row-group-size R] [--seed S]

writes ``DIR/train/part-*.parquet``, ``DIR/eval/part-*.parquet`` and ``DIR/meta.json`` (``table_sizes`` in it is
what ``data.meta_path`` reads). ``DIR`` is written as a whole into a temporary folder beside it and swapped in
at the end (:mod:`datasets.convert_io`): a failed or killed run leaves a previous ``DIR`` complete. Exit 0;
2 bad arguments or a ``DIR`` that is not a previous output (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets.canonical import canonical_arrow_schema, canonical_schema, canonical_table
from datasets.convert_io import run_converter, staged_output
from datasets.schema import SchemaConfig

__all__ = ["SyntheticParams", "generate", "synthetic_schema", "main"]

_SPLIT_SEED = {"train": 1, "eval": 2, "pilot": 3}
#: What an output folder holds (anything else makes :func:`generate` refuse to replace it).
_OUTPUT_ENTRIES = {"meta.json": "file", "train": "part-*.parquet", "eval": "part-*.parquet"}


@dataclass
class SyntheticParams:
    """Size and planted structure of a synthetic data set (see the module docstring).

    Attributes:
        num_samples: training rows.
        num_eval_samples: evaluation rows (None: ``max(1, num_samples // 10)``).
        num_users: real user ids ``1..num_users``.
        num_items: real item ids ``1..num_items`` (>= num_categories).
        num_categories: real category ids ``1..num_categories`` (>= num_clusters).
        num_clusters: clusters of related categories (None: ``max(1, num_categories // 20)``).
        max_seq_len: longest history.
        files: parquet files per split (fewer if a split has fewer rows).
        row_group_size: rows per row group (the last of each file may be shorter).
        seed: everything is a pure function of the parameters, this seed included.
        zipf_exponent: item popularity ``∝ rank ** -zipf_exponent``.
        length_median: median history length before clipping (None: ``max_seq_len / 8``).
        length_sigma: log-sd of the lognormal history length.
        max_interests: a user has ``1..max_interests`` interest clusters (at most ``num_clusters``).
        interest_rate: probability that a behaviour comes from the user's interests.
        target_interest_rate: probability that the target comes from the user's interests.
        related_weight: relatedness of two different categories of one cluster.
        mean_gap_s: mean seconds between behaviours.
        tau_s: relevance decay time in seconds (None: ``max_seq_len * mean_gap_s``).
        slope: weight of ``log1p(sum relevance)`` in the click logit.
        short_term_k: the last this many behaviours carry a per-item random effect.
        short_term_scale: std of that effect.
        target_positive_rate: positive rate the bias is calibrated to.
    """

    num_samples: int = 100_000
    num_eval_samples: Optional[int] = None
    num_users: int = 10_000
    num_items: int = 100_000
    num_categories: int = 1_000
    num_clusters: Optional[int] = None
    max_seq_len: int = 1000
    files: int = 4
    row_group_size: int = 8192
    seed: int = 0
    zipf_exponent: float = 1.1
    length_median: Optional[float] = None
    length_sigma: float = 1.0
    max_interests: int = 3
    interest_rate: float = 0.2
    target_interest_rate: float = 0.5
    related_weight: float = 0.3
    mean_gap_s: float = 3600.0
    tau_s: Optional[float] = None
    slope: float = 2.0
    short_term_k: int = 3
    short_term_scale: float = 0.5
    target_positive_rate: float = 0.3

    def resolved(self) -> "SyntheticParams":
        """A copy with the None defaults filled in, after checking the parameters."""
        p = SyntheticParams(**asdict(self))
        if p.num_eval_samples is None:
            p.num_eval_samples = max(1, p.num_samples // 10)
        if p.num_clusters is None:
            p.num_clusters = max(1, p.num_categories // 20)
        p.max_interests = min(p.max_interests, p.num_clusters)
        if p.length_median is None:
            p.length_median = max(1.0, p.max_seq_len / 8)
        if p.tau_s is None:
            p.tau_s = p.max_seq_len * p.mean_gap_s
        checks = {
            "num_samples >= 1": p.num_samples >= 1,
            "num_eval_samples >= 1": p.num_eval_samples >= 1,
            "num_users >= 1": p.num_users >= 1,
            "num_clusters >= 1": p.num_clusters >= 1,
            "num_categories >= num_clusters": p.num_categories >= p.num_clusters,
            "num_items >= num_categories": p.num_items >= p.num_categories,
            "max_seq_len >= 1": p.max_seq_len >= 1,
            "files >= 1": p.files >= 1,
            "row_group_size >= 1": p.row_group_size >= 1,
            "1 <= max_interests <= num_clusters": 1 <= p.max_interests <= p.num_clusters,
            "0 <= interest_rate <= 1": 0 <= p.interest_rate <= 1,
            "0 <= target_interest_rate <= 1": 0 <= p.target_interest_rate <= 1,
            "0 < target_positive_rate < 1": 0 < p.target_positive_rate < 1,
            "mean_gap_s > 0 and tau_s > 0": p.mean_gap_s > 0 and p.tau_s > 0,
        }
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SyntheticParams: need {', '.join(failed)}; got {asdict(self)}")
        return p


def synthetic_schema(params: SyntheticParams, with_relevance: bool = False) -> SchemaConfig:
    """The :class:`SchemaConfig` of data written by :func:`generate` with ``params``.

    Args:
        params: generator parameters (only the id counts matter).
        with_relevance: also expose ``hist_relevance`` (the ground truth; off for models).
    """
    return canonical_schema(params.num_users, params.num_items, params.num_categories, with_relevance=with_relevance)


class _World:
    """The fixed structure every sample is drawn from: item categories and popularity, category clusters,
    user interests, per-item short-term effects. Index 0 of per-id arrays is padding."""

    def __init__(self, p: SyntheticParams) -> None:
        rng = np.random.default_rng([p.seed, 0])
        c, k, n_items = p.num_categories, p.num_clusters, p.num_items
        self.cat_cluster = np.concatenate([[-1], rng.permutation(np.arange(c) % k)])  # [C + 1]
        # every category gets at least one item
        cats = np.concatenate([np.arange(1, c + 1), rng.integers(1, c + 1, n_items - c)])
        self.item_cat = np.concatenate([[0], rng.permutation(cats)])  # [I + 1]
        ranks = rng.permutation(n_items) + 1.0
        pop = np.concatenate([[0.0], ranks ** -p.zipf_exponent])  # [I + 1]
        self.global_cdf = np.cumsum(pop) / pop.sum()
        # items sorted by cluster; cumulative within-cluster popularity shifted by the cluster index, so
        # that searchsorted(cluster + u) samples an item of that cluster
        item_cluster = self.cat_cluster[self.item_cat[1:]]
        order = np.argsort(item_cluster, kind="stable")
        self.cluster_items = order + 1
        w = pop[1:][order]
        csum = np.cumsum(w)
        sorted_cluster = item_cluster[order]
        starts = np.searchsorted(sorted_cluster, np.arange(k))
        ends = np.searchsorted(sorted_cluster, np.arange(k), side="right")
        base = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0.0)
        total = csum[ends - 1] - base
        self.cluster_cdf = sorted_cluster + (csum - base[sorted_cluster]) / total[sorted_cluster]
        self.cluster_end = ends
        n_int = rng.integers(1, p.max_interests + 1, p.num_users + 1)
        self.user_n_interests = n_int
        # distinct clusters per user: redraw rows with duplicates until none are left
        interests = rng.integers(0, k, (p.num_users + 1, p.max_interests))  # [U + 1, max_interests]
        while True:
            s = np.sort(interests, axis=1)
            dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not dup.any():
                break
            interests[dup] = rng.integers(0, k, (int(dup.sum()), p.max_interests))
        self.user_interests = interests
        self.item_effect = rng.normal(0.0, p.short_term_scale, n_items + 1)

    def sample_popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cdf, rng.random(n), side="right"), len(self.global_cdf) - 1)

    def sample_in_cluster(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.cluster_cdf, clusters + rng.random(len(clusters)), side="right")
        return self.cluster_items[np.minimum(idx, self.cluster_end[clusters] - 1)]

    def sample_interest(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        pick = (rng.random(len(users)) * self.user_n_interests[users]).astype(np.int64)
        return self.sample_in_cluster(rng, self.user_interests[users, pick])


def _draw(world: _World, p: SyntheticParams, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` samples before labelling: ids, jagged histories and the logit without the bias.

    Shapes: R = n rows, E behaviours in all.
    """
    users = rng.integers(1, p.num_users + 1, n)  # [R]
    lengths = np.clip(np.rint(rng.lognormal(math.log(p.length_median), p.length_sigma, n)), 1, p.max_seq_len)
    lengths = lengths.astype(np.int64)  # [R]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    e = int(offsets[-1])
    row = np.repeat(np.arange(n), lengths)  # [E]

    interest = rng.random(e) < p.interest_rate
    items = world.sample_popular(rng, e)
    items[interest] = world.sample_interest(rng, users[row[interest]])
    cats = world.item_cat[items]
    btype_cdf_int, btype_cdf_noise = np.array([0.55, 0.7, 0.85]), np.array([0.9, 0.94, 0.97])
    u = rng.random(e)
    btype = 1 + np.where(interest, np.searchsorted(btype_cdf_int, u), np.searchsorted(btype_cdf_noise, u))

    target_interest = rng.random(n) < p.target_interest_rate
    target = world.sample_popular(rng, n)
    target[target_interest] = world.sample_interest(rng, users[target_interest])
    target_cat = world.item_cat[target]

    gaps = rng.exponential(p.mean_gap_s, e)
    csum = np.cumsum(gaps)
    delta = csum[offsets[1:] - 1][row] - csum + gaps  # seconds from behaviour j to the request, [E]

    tc = target_cat[row]
    related = np.where(
        cats == tc, 1.0, np.where(world.cat_cluster[cats] == world.cat_cluster[tc], p.related_weight, 0.0)
    )
    relevance = related * np.exp(-delta / p.tau_s)  # [E]
    total_relevance = np.bincount(row, weights=relevance, minlength=n)  # [R]
    pos_in_row = np.arange(e) - offsets[row]
    recent = pos_in_row >= (lengths - p.short_term_k)[row]
    short_term = np.bincount(row[recent], weights=world.item_effect[items[recent]], minlength=n)  # [R]
    return {
        "user_id": users,
        "item_id": target,
        "item_category": target_cat,
        "hist_lengths": lengths,
        "hist_item_id": items,
        "hist_category": cats,
        "hist_behavior_type": btype,
        "hist_time_delta": delta.astype(np.float32),
        "hist_relevance": relevance.astype(np.float32),
        "logit": p.slope * np.log1p(total_relevance) + short_term,
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_bias(world: _World, p: SyntheticParams) -> float:
    """Bias making the mean click probability of a pilot sample equal ``target_positive_rate``.

    The pilot holds about 4M behaviours at most (4096 rows of short histories, down to 256 rows of 10^5-long
    ones), so that calibration's memory stays bounded like a row group's.
    """
    mean_len = min(p.max_seq_len, p.length_median * math.exp(p.length_sigma**2 / 2))
    pilot_rows = int(np.clip(4_000_000 // max(mean_len, 1.0), 256, 4096))
    logit = _draw(world, p, pilot_rows, np.random.default_rng([p.seed, _SPLIT_SEED["pilot"]]))["logit"]
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(logit + mid).mean() < p.target_positive_rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _write_split(world: _World, p: SyntheticParams, bias: float, out: Path, split: str, rows: int) -> dict:
    """Writes one split file by file, row group by row group; returns its row and positive counts."""
    out.mkdir(parents=True)
    files = min(p.files, rows)
    per_file = [rows // files + (1 if i < rows % files else 0) for i in range(files)]
    schema = canonical_arrow_schema(with_relevance=True)
    positives = 0
    for f, n_rows in enumerate(per_file):
        with pq.ParquetWriter(out / f"part-{f:05d}.parquet", schema, compression="snappy") as writer:
            for g, start in enumerate(range(0, n_rows, p.row_group_size)):
                n = min(p.row_group_size, n_rows - start)
                rng = np.random.default_rng([p.seed, _SPLIT_SEED[split], f, g])
                d = _draw(world, p, n, rng)
                label = (rng.random(n) < _sigmoid(d.pop("logit") + bias)).astype(np.float32)
                positives += int(label.sum())
                table: pa.Table = canonical_table(label=label, **d)
                writer.write_table(table, row_group_size=n)
    return {"rows": rows, "files": files, "positives": positives, "positive_rate": positives / rows}


def generate(out_dir: str | Path, params: SyntheticParams) -> dict:
    """Writes ``out_dir/{train,eval}/part-*.parquet`` and ``out_dir/meta.json``; returns the meta dict.

    ``out_dir`` is replaced as a whole, and only once the new data is complete (written into a temporary
    folder beside it, then swapped in: :func:`datasets.convert_io.staged_output`).

    Args:
        out_dir: output folder: new, empty, or a previous output (nothing but ``meta.json`` and the split
            folders of ``part-*.parquet``).
        params: sizes, seed and planted structure.

    Returns:
        The meta: ``params`` (resolved), ``calibration`` (``slope``, ``bias``), ``num_ids`` (real ids per
        table), ``table_sizes`` (``t_*`` -> rows), ``splits`` (rows, files, positives, positive rate per
        split), ``synthetic: True``.

    Raises:
        ValueError: invalid ``params``.
        OutputError: ``out_dir`` holds something other than a previous output.
    """
    p = params.resolved()
    with staged_output(out_dir, _OUTPUT_ENTRIES) as out:
        world = _World(p)
        bias = _calibrate_bias(world, p)
        splits = {
            "train": _write_split(world, p, bias, out / "train", "train", p.num_samples),
            "eval": _write_split(world, p, bias, out / "eval", "eval", p.num_eval_samples),
        }
        meta = {
            "synthetic": True,
            "generator": "datasets.synthetic",
            "params": asdict(p),
            "calibration": {"slope": p.slope, "bias": bias},
            "num_ids": {"user_id": p.num_users, "item_id": p.num_items, "item_category": p.num_categories},
            "table_sizes": synthetic_schema(p).table_sizes(),
            "splits": splits,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    d = SyntheticParams()
    ap = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (new, empty, or a previous output; replaced)")
    ap.add_argument("--num-samples", type=int, required=True)
    ap.add_argument("--num-eval-samples", type=int, default=None, help="default: num_samples // 10")
    ap.add_argument("--num-users", type=int, default=d.num_users)
    ap.add_argument("--num-items", type=int, default=d.num_items)
    ap.add_argument("--num-categories", type=int, default=d.num_categories)
    ap.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    ap.add_argument("--files", type=int, default=d.files)
    ap.add_argument("--row-group-size", type=int, default=d.row_group_size)
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    params = SyntheticParams(
        num_samples=a.num_samples,
        num_eval_samples=a.num_eval_samples,
        num_users=a.num_users,
        num_items=a.num_items,
        num_categories=a.num_categories,
        max_seq_len=a.max_seq_len,
        files=a.files,
        row_group_size=a.row_group_size,
        seed=a.seed,
    )
    try:
        params.resolved()
    except ValueError as e:
        ap.error(str(e))
    meta, code = run_converter(lambda: generate(a.out, params), a.out)
    if meta is None:
        return code
    print(json.dumps({"out": a.out, "splits": meta["splits"], "table_sizes": meta["table_sizes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
