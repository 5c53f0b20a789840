"""How :mod:`datasets.synthetic_requests` draws and labels a request (labelled synthetic): the retrieval of
its candidates, the true click model with set effects, the logging policy, and their calibration.

:func:`set_features` recomputes from a request's columns the per-candidate terms of the true click model
(affinity, complement lift ``f_comp``, near-duplicate suppression ``f_dup``) and ``cand_cross``; ``_draw``
draws requests from a :class:`~datasets.synthetic_requests_world.RequestWorld` (users, histories, candidate
sets) with their true logit and policy logit before the biases; ``_calibrate`` bisects the two biases on a
pilot sample and measures the strength of the set effects there. The formulas are in the module docstring of
:mod:`datasets.synthetic_requests`, which labels and writes the requests.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from datasets.synthetic_requests_world import RequestParams, RequestWorld

__all__ = ["CROSS_LEVELS", "set_features"]

#: Random streams: ``[seed, _SPLIT_SEED[split], file, row group]`` for the splits, ``[seed, 4]`` for the pilot.
_SPLIT_SEED = {"train": 1, "valid": 2, "test": 3, "pilot": 4}
#: cand_cross takes values 1..CROSS_LEVELS (table size CROSS_LEVELS + 1).
CROSS_LEVELS = 8
_PILOT_REQUESTS = 2000


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


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
        ``affinity``, ``f_comp``, ``f_dup`` (see :mod:`datasets.synthetic_requests`) and ``pointwise_logit`` (the
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
