"""The world of :mod:`datasets.synthetic_requests` (labelled synthetic): its parameters and the fixed structure
every request is drawn from.

:class:`RequestParams` holds the sizes, the seed and the planted structure of a data set (defaults: the
benchmark size); :class:`RequestWorld` is the users, items, categories and clusters they fix: categories in
clusters, the complement pairing of categories, items with a category, a near-duplicate group, a Zipf
popularity and a quality, users with interest clusters and a segment. ``_Buckets`` samples items
popularity-weighted within a cluster, category or near-duplicate group. The click model and the logging
policy are in :mod:`datasets.synthetic_requests_clicks`; the module docstring of
:mod:`datasets.synthetic_requests` describes the whole process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["RequestParams", "RequestWorld"]


@dataclass
class RequestParams:
    """Size and planted structure of a synthetic request-level data set (see :mod:`datasets.synthetic_requests`).

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
