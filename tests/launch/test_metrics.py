"""AUC / GAUC / logloss against plain pairwise references."""

import itertools
import math

import numpy as np
import torch

from launch.metrics import auc, ctr_metrics, gauc, logloss


def _pairwise_auc(s, y):
    pos = [a for a, b in zip(s, y) if b == 1]
    neg = [a for a, b in zip(s, y) if b == 0]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(200), 1)  # many ties
    y = (rng.random(200) < 0.4).astype(int)
    assert math.isclose(auc(torch.tensor(s), torch.tensor(y)), _pairwise_auc(s, y), abs_tol=1e-6)


def test_gauc_is_impression_weighted_mean_over_groups_with_both_classes():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 15, 400)
    s = np.round(rng.random(400), 2)
    y = (rng.random(400) < 0.3).astype(int)
    y[g == 3] = 1  # a group with positives only: excluded
    num = den = 0.0
    for k in np.unique(g):
        a = _pairwise_auc(s[g == k], y[g == k])
        if a is not None:
            num += a * (g == k).sum()
            den += (g == k).sum()
    got = gauc(torch.tensor(s), torch.tensor(y), torch.tensor(g))
    assert math.isclose(got, num / den, abs_tol=1e-9)


def test_gauc_perfect_within_groups_even_when_global_order_is_wrong():
    # Group 0 scores are all above group 1's, labels make the global AUC poor but each group is perfect.
    s = torch.tensor([0.9, 0.8, 0.2, 0.1])
    y = torch.tensor([0, 0, 1, 0])
    y = torch.tensor([1, 0, 1, 0])
    g = torch.tensor([0, 0, 1, 1])
    assert gauc(s, y, g) == 1.0
    assert auc(s, y) == 0.75


def test_logloss_and_task_names():
    logits = torch.tensor([[0.0, 2.0], [0.0, -2.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    m = ctr_metrics(logits, labels, torch.tensor([1, 1]), ["click", "like"])
    assert math.isclose(m["logloss"], math.log(2), rel_tol=1e-9)
    p = 1 / (1 + math.exp(-2))
    assert math.isclose(m["logloss/like"], -math.log(p), rel_tol=1e-6)
    assert m["auc/like"] == 1.0 and m["auc"] == 0.5
    assert logloss(torch.tensor([1.0]), torch.tensor([0.0])) > 10  # clamped, finite
