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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets.convert_io import run_converter, staged_output
from datasets.schema import FloatFeature, IdFeature, SchemaConfig

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
_SPLIT_SEED = {"train": 1, "valid": 2, "test": 3, "pilot": 4}
#: What an output folder holds (anything else makes :func:`generate` refuse to replace it).
_OUTPUT_ENTRIES = {"meta.json": "file", **{s: "part-*.parquet" for s in SPLITS}}
#: cand_cross takes values 1..CROSS_LEVELS (table size CROSS_LEVELS + 1).
CROSS_LEVELS = 8
_PILOT_REQUESTS = 2000


@dataclass
class RequestParams:
    """Size and planted structure of a synthetic request-level data set (see the module docstring).

    Attributes:
        num_requests: training requests.
        num_valid: validation requests.
        num_test: test requests.
        num_users: user ids ``1..num_users``.
        num_items: item ids ``1..num_items`` (>= num_categories * num_subclusters, >= max_candidates).
        num_categories: category ids ``1..num_categories`` (>= num_clusters, >= 2).
        num_clusters: clusters of related categories (None: ``max(1, num_categories // 5)``).
        num_subclusters: sub-clusters per category; (category, sub-cluster) is a near-duplicate group.
        num_segments: user segments ``1..num_segments``.
        min_candidates: fewest candidates of a request (>= 2).
        max_candidates: most candidates of a request.
        max_history: longest history.
        exposed_per_request: expected exposed candidates per request (None: 10% of the mean m).
        files: parquet files per split (fewer if a split has fewer row groups).
        row_group_size: requests per row group (the last of each file may be shorter).
        seed: everything is a pure function of the parameters, this seed included.
        zipf_exponent: item popularity ``∝ rank ** -zipf_exponent``.
        quality_scale: std of the item quality in the true logit.
        max_interests: a user has ``1..max_interests`` interest clusters (at most ``num_clusters``).
        interest_rate: probability that a behaviour comes from the user's interests.
        history_median: median history length before clipping (None: ``max_history / 3``).
        history_sigma: log-sd of the lognormal history length.
        retrieval_interest: probability that a candidate slot is an interest item.
        retrieval_complement: mean share of complement slots (a request's share is ``U(0, 2x)``).
        retrieval_duplicate: mean share of near-duplicate slots (a request's share is ``U(0, 2x)``).
        related_weight: weight of the other categories of the candidate's cluster in the affinity.
        affinity_weight: ``a``, weight of the affinity in the true logit.
        complement_weight: ``b``, weight of ``f_comp`` (fraction of the other candidates) in the true logit.
        duplicate_weight: ``c``, weight of ``f_dup`` (subtracted) in the true logit.
        target_true_ctr: mean true click probability over all candidates (calibrates ``bias``).
        popularity_weight: weight of standardised log-popularity in the logging policy's logit.
        policy_affinity_weight: weight of the affinity in the logging policy's logit.
        policy_noise: std of the policy logit's per-candidate noise.
        p_min: smallest propensity.
    """

    num_requests: int = 20_000
    num_valid: int = 3_000
    num_test: int = 3_000
    num_users: int = 5_000
    num_items: int = 20_000
    num_categories: int = 200
    num_clusters: Optional[int] = None
    num_subclusters: int = 4
    num_segments: int = 8
    min_candidates: int = 200
    max_candidates: int = 200
    max_history: int = 100
    exposed_per_request: Optional[float] = None
    files: int = 4
    row_group_size: int = 1000
    seed: int = 0
    zipf_exponent: float = 1.1
    quality_scale: float = 0.5
    max_interests: int = 3
    interest_rate: float = 0.8
    history_median: Optional[float] = None
    history_sigma: float = 0.8
    retrieval_interest: float = 0.4
    retrieval_complement: float = 0.1
    retrieval_duplicate: float = 0.1
    related_weight: float = 0.3
    affinity_weight: float = 5.0
    complement_weight: float = 40.0
    duplicate_weight: float = 80.0
    target_true_ctr: float = 0.1
    popularity_weight: float = 1.0
    policy_affinity_weight: float = 8.0
    policy_noise: float = 0.8
    p_min: float = 0.005

    def resolved(self) -> "RequestParams":
        """A copy with the None defaults filled in, after checking the parameters."""
        p = RequestParams(**asdict(self))
        if p.num_clusters is None:
            p.num_clusters = max(1, p.num_categories // 5)
        p.max_interests = max(1, min(p.max_interests, p.num_clusters))
        if p.history_median is None:
            p.history_median = max(1.0, p.max_history / 3)
        if p.exposed_per_request is None:
            p.exposed_per_request = 0.1 * (p.min_candidates + p.max_candidates) / 2
        retrieval = p.retrieval_interest + 2 * p.retrieval_complement + 2 * p.retrieval_duplicate
        checks = {
            "num_requests >= 1": p.num_requests >= 1,
            "num_valid >= 1": p.num_valid >= 1,
            "num_test >= 1": p.num_test >= 1,
            "num_users >= 1": p.num_users >= 1,
            "num_categories >= 2": p.num_categories >= 2,
            "1 <= num_clusters <= num_categories": 1 <= p.num_clusters <= p.num_categories,
            "num_subclusters >= 1": p.num_subclusters >= 1,
            "num_segments >= 1": p.num_segments >= 1,
            "num_items >= num_categories * num_subclusters": p.num_items >= p.num_categories * p.num_subclusters,
            "2 <= min_candidates <= max_candidates": 2 <= p.min_candidates <= p.max_candidates,
            "max_candidates <= num_items": p.max_candidates <= p.num_items,
            "max_history >= 1": p.max_history >= 1,
            "0 < exposed_per_request <= min_candidates": 0 < p.exposed_per_request <= p.min_candidates,
            "files >= 1": p.files >= 1,
            "row_group_size >= 1": p.row_group_size >= 1,
            "0 <= interest_rate <= 1": 0 <= p.interest_rate <= 1,
            "retrieval shares >= 0": min(p.retrieval_interest, p.retrieval_complement, p.retrieval_duplicate) >= 0,
            "retrieval_interest + 2 * retrieval_complement + 2 * retrieval_duplicate <= 1": retrieval <= 1 + 1e-12,
            "0 < target_true_ctr < 1": 0 < p.target_true_ctr < 1,
            "0 < p_min < 1": 0 < p.p_min < 1,
            "exposed_per_request > p_min * mean candidates": (
                p.exposed_per_request > p.p_min * (p.min_candidates + p.max_candidates) / 2
            ),
            "quality_scale, policy_noise, history_sigma >= 0": min(
                p.quality_scale, p.policy_noise, p.history_sigma
            ) >= 0,
        }
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid RequestParams: need {', '.join(failed)}; got {asdict(self)}")
        return p


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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _Buckets:
    """Samples items popularity-weighted within a bucket (cluster, category or near-duplicate group).

    Items sorted by bucket; the cumulative within-bucket popularity shifted by the bucket index, so that
    ``searchsorted(bucket + u)`` lands on an item of that bucket. Every bucket must be non-empty.
    """

    def __init__(self, keys: np.ndarray, weights: np.ndarray, num_buckets: int) -> None:
        order = np.argsort(keys, kind="stable")  # keys [I]: bucket of items 1..I
        self.items = order + 1
        sk = keys[order]
        csum = np.cumsum(weights[order])
        starts = np.searchsorted(sk, np.arange(num_buckets))
        ends = np.searchsorted(sk, np.arange(num_buckets), side="right")
        assert (ends > starts).all(), "every bucket needs an item"
        base = np.where(starts > 0, csum[np.maximum(starts - 1, 0)], 0.0)
        total = csum[ends - 1] - base
        self.cdf = sk + (csum - base[sk]) / total[sk]
        self.start, self.end = starts, ends

    def sample(self, rng: np.random.Generator, buckets: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.cdf, buckets + rng.random(len(buckets)), side="right")
        return self.items[np.clip(idx, self.start[buckets], self.end[buckets] - 1)]


class RequestWorld:
    """The fixed structure every request is drawn from (a pure function of ``params``, seed included).

    Per-id arrays have index 0 as padding.

    Attributes:
        cat_cluster: ``[C + 1]`` cluster (0-based) of each category (-1 at 0).
        complement: ``[C + 1]`` the complementary category of each category (0 at 0).
        item_cat: ``[I + 1]`` category of each item.
        item_group: ``[I + 1]`` near-duplicate group ``(cat - 1) * num_subclusters + sub-cluster`` (-1 at 0).
        item_zpop: ``[I + 1]`` standardised log-popularity.
        item_quality: ``[I + 1]`` quality ``q`` in the true logit.
        user_interests: ``[U + 1, max_interests]`` interest clusters (the first ``user_n_interests`` count).
        user_n_interests: ``[U + 1]``.
        user_segment: ``[U + 1]`` segment (from 1; 0 at 0).
    """

    def __init__(self, params: RequestParams) -> None:
        p = params.resolved()
        rng = np.random.default_rng([p.seed, 0])
        c, k, s, n_items = p.num_categories, p.num_clusters, p.num_subclusters, p.num_items
        self.cat_cluster = np.concatenate([[-1], rng.permutation(np.arange(c) % k)])
        order = rng.permutation(np.arange(1, c + 1))
        comp = np.zeros(c + 1, dtype=np.int64)
        comp[order[0:-1:2]], comp[order[1::2]] = order[1::2], order[0:-1:2]
        if c % 2:
            comp[order[-1]] = order[0]
        self.complement = comp
        # every (category, sub-cluster) group gets an item, the rest are random
        first = np.arange(c * s)
        rest = rng.integers(0, c * s, n_items - c * s)
        groups = rng.permutation(np.concatenate([first, rest]))  # [I]
        self.item_group = np.concatenate([[-1], groups])
        self.item_cat = np.concatenate([[0], groups // s + 1])
        ranks = rng.permutation(n_items) + 1.0
        pop = ranks**-p.zipf_exponent  # [I]
        logpop = np.log(pop)
        self.item_zpop = np.concatenate([[0.0], (logpop - logpop.mean()) / max(logpop.std(), 1e-12)])
        self.item_quality = np.concatenate([[0.0], rng.normal(0.0, p.quality_scale, n_items)])
        self.global_cdf = np.cumsum(pop) / pop.sum()
        self.by_cluster = _Buckets(self.cat_cluster[self.item_cat[1:]], pop, k)
        self.by_category = _Buckets(self.item_cat[1:] - 1, pop, c)
        self.by_group = _Buckets(groups, pop, c * s)
        n_int = rng.integers(1, p.max_interests + 1, p.num_users + 1)
        interests = rng.integers(0, k, (p.num_users + 1, p.max_interests))
        while True:  # distinct clusters per user: redraw rows with duplicates
            srt = np.sort(interests, axis=1)
            dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not dup.any():
                break
            interests[dup] = rng.integers(0, k, (int(dup.sum()), p.max_interests))
        self.user_n_interests = n_int
        self.user_interests = interests
        self.user_segment = 1 + interests[:, 0] % p.num_segments
        self.user_segment[0] = 0
        self.num_items = n_items

    def sample_popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return 1 + np.minimum(np.searchsorted(self.global_cdf, rng.random(n), side="right"), self.num_items - 1)

    def sample_interest(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        pick = (rng.random(len(users)) * self.user_n_interests[users]).astype(np.int64)
        return self.by_cluster.sample(rng, self.user_interests[users, pick])


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _dedup(items: np.ndarray, row: np.ndarray, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """Replaces repeats of an item within a request (all but its first slot) by uniformly random items."""
    while True:
        key = row * (num_items + 1) + items
        order = np.argsort(key, kind="stable")
        repeat = np.zeros(len(items), dtype=bool)
        repeat[order[1:][key[order][1:] == key[order][:-1]]] = True
        if not repeat.any():
            return items
        items[repeat] = rng.integers(1, num_items + 1, int(repeat.sum()))


def set_features(
    world: RequestWorld,
    p: RequestParams,
    hist_lengths: np.ndarray,
    hist_category: np.ndarray,
    cand_lengths: np.ndarray,
    cand_item_id: np.ndarray,
) -> dict[str, np.ndarray]:
    """The per-candidate quantities of the true click model, recomputed from a request's columns.

    Shapes: R requests, E behaviours, N candidates in all (the rows' lists concatenated).

    Args:
        world: the world of the data set.
        p: its (resolved) parameters.
        hist_lengths: ``[R]``.
        hist_category: ``[E]``.
        cand_lengths: ``[R]`` (m per request).
        cand_item_id: ``[N]``.

    Returns:
        ``[N]`` arrays: ``n_hist_cat`` (behaviours in the candidate's category), ``cross`` (``cand_cross``),
        ``affinity``, ``f_comp``, ``f_dup`` (see the module docstring) and ``pointwise_logit`` (the
        true logit's affinity and quality terms) and ``set_logit`` (its complement and duplicate terms),
        both without the bias.
    """
    n, c, k, g = len(hist_lengths), p.num_categories + 1, p.num_clusters, p.num_categories * p.num_subclusters
    hrow = np.repeat(np.arange(n), hist_lengths)
    crow = np.repeat(np.arange(n), cand_lengths)
    cat = world.item_cat[cand_item_id]
    cluster = world.cat_cluster[cat]
    hist_cat_count = np.bincount(hrow * c + hist_category, minlength=n * c)  # [R * (C + 1)]
    hist_cluster_count = np.bincount(hrow * k + world.cat_cluster[hist_category], minlength=n * k)
    n_cat = hist_cat_count[crow * c + cat]
    n_cluster = hist_cluster_count[crow * k + cluster]
    affinity = (n_cat + p.related_weight * (n_cluster - n_cat)) / hist_lengths[crow]
    cand_cat_count = np.bincount(crow * c + cat, minlength=n * c)
    others = (cand_lengths - 1)[crow].astype(np.float64)
    f_comp = cand_cat_count[crow * c + world.complement[cat]] / others
    group = world.item_group[cand_item_id]
    group_count = np.bincount(crow * g + group, minlength=n * g)
    f_dup = (group_count[crow * g + group] - 1) / others
    cross = 1 + np.minimum(CROSS_LEVELS - 1, np.floor(np.log2(1.0 + n_cat))).astype(np.int64)
    return {
        "n_hist_cat": n_cat,
        "cross": cross,
        "affinity": affinity,
        "f_comp": f_comp,
        "f_dup": f_dup,
        "pointwise_logit": p.affinity_weight * affinity + world.item_quality[cand_item_id],
        "set_logit": p.complement_weight * f_comp - p.duplicate_weight * f_dup,
    }


def _draw(world: RequestWorld, p: RequestParams, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` requests before labelling: ids, histories, candidates, their true logit and policy logit
    (both without their biases). Shapes: R = n requests, E behaviours, N candidates in all."""
    users = rng.integers(1, p.num_users + 1, n)  # [R]
    hlen = np.rint(rng.lognormal(math.log(p.history_median), p.history_sigma, n))
    hlen = np.clip(hlen, 1, p.max_history).astype(np.int64)  # [R]
    hrow = np.repeat(np.arange(n), hlen)  # [E]
    interest = rng.random(len(hrow)) < p.interest_rate
    hist = world.sample_popular(rng, len(hrow))
    hist[interest] = world.sample_interest(rng, users[hrow[interest]])

    m = rng.integers(p.min_candidates, p.max_candidates + 1, n)  # [R]
    crow = np.repeat(np.arange(n), m)  # [N]
    s_comp = rng.uniform(0, 2 * p.retrieval_complement, n)[crow]
    s_dup = rng.uniform(0, 2 * p.retrieval_duplicate, n)[crow]
    u = rng.random(len(crow))
    is_int = u < p.retrieval_interest
    is_comp = ~is_int & (u < p.retrieval_interest + s_comp)
    is_dup = ~is_int & ~is_comp & (u < p.retrieval_interest + s_comp + s_dup)
    cand = world.sample_popular(rng, len(crow))
    cand[is_int] = world.sample_interest(rng, users[crow[is_int]])
    # complement / near-duplicate slots copy from a random interest slot of their request (anchor)
    int_pos = np.flatnonzero(is_int)  # sorted, hence grouped by request
    n_int = np.bincount(crow[is_int], minlength=n)
    int_off = _offsets(n_int)
    anchored = np.flatnonzero((is_comp | is_dup) & (n_int[crow] > 0))
    r = crow[anchored]
    pick = int_off[r] + (rng.random(len(anchored)) * n_int[r]).astype(np.int64)
    anchor = cand[int_pos[pick]]
    comp_slots = is_comp[anchored]
    cand[anchored[comp_slots]] = world.by_category.sample(rng, world.complement[world.item_cat[anchor[comp_slots]]] - 1)
    cand[anchored[~comp_slots]] = world.by_group.sample(rng, world.item_group[anchor[~comp_slots]])
    cand = _dedup(cand, crow, p.num_items, rng)

    f = set_features(world, p, hlen, world.item_cat[hist], m, cand)
    policy = (
        p.popularity_weight * world.item_zpop[cand]
        + p.policy_affinity_weight * f["affinity"]
        + rng.normal(0.0, p.policy_noise, len(crow))
    )
    return {
        "users": users,
        "hist_lengths": hlen,
        "hist_item_id": hist,
        "cand_lengths": m,
        "cand_item_id": cand,
        "cross": f["cross"],
        "pointwise_logit": f["pointwise_logit"],
        "set_logit": f["set_logit"],
        "policy_logit": policy,
        "f_comp": f["f_comp"],
        "u_click": rng.random(len(crow)),
        "u_expose": rng.random(len(crow)),
    }


def _bisect(mean_at: Callable[[float], float], target: float) -> float:
    """The bias b in [-30, 30] with ``mean_at(b) == target`` (``mean_at`` increasing)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _propensity(policy_logit: np.ndarray, policy_bias: float, p_min: float) -> np.ndarray:
    return np.clip(_sigmoid(policy_logit + policy_bias), p_min, 1.0)


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _calibrate(world: RequestWorld, p: RequestParams) -> tuple[dict, dict]:
    """Bisects the true-click bias and the policy bias on a pilot sample; returns them and the pilot's
    set-effect statistics (AUC of the true logit with and without the set terms against true clicks)."""
    d = _draw(world, p, _PILOT_REQUESTS, np.random.default_rng([p.seed, _SPLIT_SEED["pilot"]]))
    z_point, z_set = d["pointwise_logit"], d["set_logit"]
    bias = _bisect(lambda b: float(_sigmoid(z_point + z_set + b).mean()), p.target_true_ctr)
    per_candidate = p.exposed_per_request * _PILOT_REQUESTS / len(z_point)
    policy_bias = _bisect(lambda b: float(_propensity(d["policy_logit"], b, p.p_min).mean()), per_candidate)
    click = d["u_click"] < _sigmoid(z_point + z_set + bias)
    exposed = d["u_expose"] < _propensity(d["policy_logit"], policy_bias, p.p_min)
    crow = np.repeat(np.arange(_PILOT_REQUESTS), d["cand_lengths"])
    z_comp = p.complement_weight * d["f_comp"]
    full = z_point + z_set
    stats = {
        "pilot_requests": _PILOT_REQUESTS,
        "pilot_candidates": int(len(full)),
        "auc_true_logit": _auc(full, click),
        "auc_without_set_terms": _auc(z_point, click),
        "auc_without_complement": _auc(full - z_comp, click),
        "auc_without_duplicates": _auc(z_point + z_comp, click),
        "auc_set_terms_only": _auc(z_set, click),
        "auc_true_logit_exposed": _auc(full[exposed], click[exposed]),
        "auc_policy_logit": _auc(d["policy_logit"], click),
        "std_pointwise_terms": float(z_point.std()),
        "std_set_terms": float(z_set.std()),
        "std_set_terms_within_request": float(np.sqrt(np.mean(
            (z_set - (np.bincount(crow, weights=z_set) / d["cand_lengths"])[crow]) ** 2))),
        "corr_policy_true_logit": float(np.corrcoef(d["policy_logit"], full)[0, 1]),
    }
    return {"true_bias": bias, "policy_bias": policy_bias}, stats


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
