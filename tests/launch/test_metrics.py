"""AUC / GAUC / logloss against plain pairwise references; masks, notes; ranking metrics against hand values."""

import itertools
import math

import numpy as np
import pytest
import torch

from launch.metrics import (
    METRIC_SETS,
    MetricOptions,
    auc,
    ctr_metrics,
    gauc,
    logloss,
    preranking_metrics,
    ranking_metrics,
    recall_ndcg_at_k,
    request_auc,
)


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


# ----- masks and notes (ctr set) -----


def test_ctr_mask_selects_rows_per_task():
    # Task "click": scores 0.1 .. 0.4 (as logits: the sigmoid keeps the order), labels 1, 0, 1, 0.
    # Unmasked: positives {0.1, 0.3} vs negatives {0.2, 0.4}: only 0.3 > 0.2 wins -> AUC 1/4.
    # Masking row 3 out of "click" leaves negatives {0.2}: 0.3 wins, 0.1 loses -> AUC 1/2.
    # Task "like": all logits 0 (p = 1/2), logloss log 2 whatever the labels; the mask keeps rows 0 and 1.
    logits = torch.tensor([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.4, 0.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, float("nan")], [0.0, float("nan")]])  # NaN: masked out
    groups = torch.tensor([5, 5, 5, 5])
    assert ctr_metrics(logits[:, :1], labels[:, :1], groups, ["click"])["auc"] == 0.25
    mask = torch.tensor([[True, True], [True, True], [True, False], [False, False]])
    m = ctr_metrics(logits, labels, groups, ["click", "like"], mask)
    assert m["auc"] == m["auc/click"] == 0.5 and m["gauc/click"] == 0.5  # one group: GAUC = its AUC
    assert m["auc/like"] == 0.5  # both kept rows tie (p = 1/2): half credit
    assert math.isclose(m["logloss/like"], math.log(2), rel_tol=1e-12)
    assert m["eval_samples"] == 3 and m["eval_samples/click"] == 3 and m["eval_samples/like"] == 2
    assert m["notes"] == []


def test_ctr_undefined_auc_is_nan_with_a_note():
    n = 9000
    logits = torch.linspace(-2, 2, n).unsqueeze(1).repeat(1, 2)
    labels = torch.zeros(n, 2)
    labels[::3, 1] = 1.0  # "like" has both classes
    groups = torch.arange(n) % 7
    m = ctr_metrics(logits, labels, groups, ["click", "like"])
    assert math.isnan(m["auc"]) and math.isnan(m["auc/click"]) and math.isnan(m["gauc/click"])
    assert not math.isnan(m["auc/like"]) and math.isfinite(m["logloss/click"])
    assert m["notes"] == [
        "auc/click: all 9000 evaluation labels are 0; AUC is undefined",
        "gauc/click: none of the 7 groups has both a positive and a negative; GAUC is undefined",
    ]
    mask = torch.zeros(n, 2, dtype=torch.bool)
    mask[:10, 1] = True
    mask[::3, 0] = True  # rows whose "like" is 1; "click" is 0 there
    m = ctr_metrics(logits, labels, groups, ["click", "like"], mask)
    assert m["notes"][0] == (
        "auc/click: all 3000 evaluation labels are 0 (the mask leaves out 6000 of 9000 rows); AUC is undefined"
    )
    assert m["eval_samples/like"] == 10 and m["eval_samples"] == 3000 + 6  # rows 1, 2, 4, 5, 7, 8 only in "like"
    empty = ctr_metrics(logits, labels, groups, ["click", "like"], torch.zeros(n, 2, dtype=torch.bool))
    assert all(math.isnan(empty[k]) for k in ("auc", "gauc", "logloss", "auc/like"))
    assert empty["notes"][1] == (
        "auc/like, gauc/like, logloss/like: no evaluation rows (the mask leaves out 9000 of 9000 rows); they are"
        " undefined"
    )
    assert empty["eval_samples"] == 0


def test_ctr_metrics_checks_shapes():
    with pytest.raises(ValueError, match="mask"):
        ctr_metrics(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3), ["click"], torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="T = 2"):
        ctr_metrics(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3), ["click", "like"])


# ----- ranking set -----

L3, L5 = math.log2(3), math.log2(5)

# One task, five requests, rows shuffled (a request's rows are not contiguous). Per request, scores descending:
#   A (id 7): 0.9 neg, 0.8 pos, 0.3 pos, 0.1 neg
#   B (id 3): 0.5 pos, 0.2 neg
#   C (id 5): 0.6 neg, 0.4 neg, 0.2 neg                   all negatives: skipped everywhere
#   D (id 9): 0.6 neg, then a tie 0.4 pos / 0.4 neg / 0.4 neg   each tied slot counts 1/3 of a positive
#   E (id 2): 0.7 pos                                      one class: skipped by AUC only
ROWS = [  # (request, score, label)
    (7, 0.9, 0), (7, 0.8, 1), (7, 0.3, 1), (7, 0.1, 0),
    (3, 0.5, 1), (3, 0.2, 0),
    (5, 0.6, 0), (5, 0.4, 0), (5, 0.2, 0),
    (9, 0.6, 0), (9, 0.4, 1), (9, 0.4, 0), (9, 0.4, 0),
    (2, 0.7, 1),
]
# AUC (pairs positive > negative, ties half): A 2/4 (0.8 > 0.1, 0.3 > 0.1), B 1, D (0 + 1/2 + 1/2) / 3 = 1/3.
REQUEST_AUC = (0.5 + 1.0 + 1 / 3) / 3  # 11/18
# Recall@K = positives in the top K / positives of the request; K = 5 exceeds every list: 1 each.
RECALL = {1: (0 + 1 + 0 + 1) / 4, 2: (1 / 2 + 1 + 1 / 3 + 1) / 4, 5: 1.0}  # over A, B, D, E
# NDCG@K: DCG = sum over top-K slots of rel / log2(slot + 2), IDCG over the request's own positives:
#   A: @1 0 / 1; @2 (1/log2 3) / (1 + 1/log2 3); @5 (1/log2 3 + 1/2) / (1 + 1/log2 3)
#   D (1 positive, IDCG = 1): @1 0; @2 (1/3) / log2 3; @5 (1/3) (1/log2 3 + 1/2 + 1/log2 5)
#   B and E: 1 at every K.
NDCG = {
    1: (0 + 1 + 0 + 1) / 4,
    2: ((1 / L3) / (1 + 1 / L3) + 1 + (1 / 3) / L3 + 1) / 4,
    5: ((1 / L3 + 0.5) / (1 + 1 / L3) + 1 + (1 / 3) * (1 / L3 + 0.5 + 1 / L5) + 1) / 4,
}


def _ranking_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(ROWS), generator=torch.Generator().manual_seed(seed))
    r, s, y = (torch.tensor([ROWS[i][j] for i in order.tolist()]) for j in range(3))
    return s.double(), y.float(), r


def test_request_auc_and_recall_ndcg_by_hand():
    s, y, r = _ranking_rows()
    a = request_auc(s, y, r)
    assert math.isclose(a.value, REQUEST_AUC, rel_tol=1e-12) and (a.requests, a.skipped) == (5, 2)
    rk = recall_ndcg_at_k(s, y, r, [1, 2, 5])
    assert (rk.requests, rk.skipped) == (5, 1)
    for k in (1, 2, 5):
        assert math.isclose(rk.recall[k], RECALL[k], rel_tol=1e-12), k
        assert math.isclose(rk.ndcg[k], NDCG[k], rel_tol=1e-12), k


def test_ranking_metric_set_keys_mask_and_row_order():
    s, y, r = _ranking_rows(1)
    logits = torch.stack([s, s], dim=1)
    labels = torch.stack([y, y], dim=1)
    m = METRIC_SETS["ranking"](logits, labels, r, ["click", "buy"], None, MetricOptions(ks=[1, 2, 5]))
    assert math.isclose(m["request_auc"], REQUEST_AUC, rel_tol=1e-12) and m["request_auc/buy"] == m["request_auc"]
    assert math.isclose(m["recall@2/click"], RECALL[2], rel_tol=1e-12)
    assert math.isclose(m["ndcg@5"], NDCG[5], rel_tol=1e-12)
    assert m["requests"] == 5 and m["requests_skipped_auc"] == 2 and m["requests_skipped_no_positive/buy"] == 1
    assert m["eval_samples"] == 14 and m["notes"] == []
    flipped = (x.flip(0) for x in (logits, labels, r))
    assert m == ranking_metrics(*flipped, ["click", "buy"], None, MetricOptions([1, 2, 5]))  # row order is irrelevant
    # Mask out, for "buy" only, A's top negative (0.9): A becomes 0.8 pos, 0.3 pos, 0.1 neg: AUC 1,
    # Recall@1 1/2, NDCG@1 1, NDCG@2 (1 + 1/log2 3) / (1 + 1/log2 3) = 1.
    mask = torch.ones(14, 2, dtype=torch.bool)
    mask[(r == 7) & (s > 0.85), 1] = False
    m = ranking_metrics(logits, labels, r, ["click", "buy"], mask, MetricOptions(ks=[1, 2]))
    assert math.isclose(m["request_auc/buy"], (1 + 1 + 1 / 3) / 3, rel_tol=1e-12)
    assert math.isclose(m["recall@1/buy"], (1 / 2 + 1 + 0 + 1) / 4, rel_tol=1e-12)
    assert math.isclose(m["ndcg@1/buy"], (1 + 1 + 0 + 1) / 4, rel_tol=1e-12)
    assert math.isclose(m["ndcg@2/buy"], (1 + 1 + (1 / 3) / L3 + 1) / 4, rel_tol=1e-12)
    assert math.isclose(m["recall@1/click"], RECALL[1], rel_tol=1e-12)  # "click" keeps every row
    assert m["eval_samples"] == 14  # the masked row is still in "click"


def test_ranking_ties_are_averaged_not_ordered_by_position():
    # One request of 4 candidates, all scored 0 (a constant model), positives at rows 0 and 3: whatever the row
    # order, every slot counts 2/4 of a positive: Recall@1 = (1/2) / 2, NDCG@1 = (1/2) / 1, Recall@4 = 1,
    # NDCG@4 = (1/2)(1 + 1/log2 3 + 1/2 + 1/log2 5) / (1 + 1/log2 3).  Request AUC: all pairs tie: 1/2.
    s, y, r = torch.zeros(4), torch.tensor([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long)
    for labels in (y, y.flip(0)):
        rk = recall_ndcg_at_k(s, labels, r, [1, 4])
        assert rk.recall == {1: 0.25, 4: 1.0} and rk.ndcg[1] == 0.5
        assert math.isclose(rk.ndcg[4], 0.5 * (1 + 1 / L3 + 0.5 + 1 / L5) / (1 + 1 / L3), rel_tol=1e-12)
        assert request_auc(s, labels, r).value == 0.5


def test_ranking_undefined_metrics_are_nan_with_notes():
    s = torch.tensor([0.3, 0.2, 0.1, 0.5])
    y = torch.tensor([[0.0], [0.0], [0.0], [0.0]])
    r = torch.tensor([1, 1, 2, 2])
    m = ranking_metrics(s.unsqueeze(1), y, r, ["click"], options=MetricOptions(ks=[3]))
    assert math.isnan(m["request_auc"]) and math.isnan(m["recall@3"]) and math.isnan(m["ndcg@3/click"])
    assert m["requests"] == 2 and m["requests_skipped_auc"] == 2 and m["requests_skipped_no_positive"] == 2
    assert m["notes"] == [
        "request_auc/click: none of the 2 requests has both a positive and a negative; per-request AUC is undefined",
        "recall@K/click, ndcg@K/click: none of the 2 requests has a positive; Recall@K and NDCG@K are undefined",
    ]
    none = ranking_metrics(s.unsqueeze(1), y, r, ["click"], torch.zeros(4, 1, dtype=torch.bool))
    assert none["requests"] == 0 and math.isnan(none["recall@10"])
    assert none["notes"] == [
        "click: no evaluation rows (the mask leaves out 4 of 4 rows); request AUC, Recall@K and NDCG@K are undefined"
    ]


def test_metric_sets_registry_and_options():
    assert set(METRIC_SETS) == {"ctr", "ranking", "preranking"} and METRIC_SETS["ctr"] is ctr_metrics
    assert MetricOptions().ks == [1, 5, 10]
    for ks in ([], [0], [5, 5], [2.5]):
        with pytest.raises(ValueError, match="ks"):
            MetricOptions(ks=ks)


def test_preranking_set_combines_pointwise_per_user_and_per_request_metrics():
    # Two tasks over the same candidates: "click" over the exposed rows only (mask), "true" over every row.
    s, y, r = _ranking_rows(2)
    n = s.numel()
    users = r % 2  # two users, each with several requests
    exposed = torch.arange(n) % 3 != 0
    logits = torch.stack([s, s], dim=1)
    labels = torch.stack([y, y], dim=1)
    mask = torch.stack([exposed, torch.ones(n, dtype=torch.bool)], dim=1)
    opts = MetricOptions(ks=[1, 2])
    m = preranking_metrics(logits, labels, r, ["click", "true"], mask, opts, users=users)
    ref_click = ctr_metrics(logits[:, :1], labels[:, :1], users, ["click"], mask[:, :1])
    ref_true = ctr_metrics(logits[:, 1:], labels[:, 1:], users, ["true"], mask[:, 1:])
    rank = ranking_metrics(logits, labels, r, ["click", "true"], mask, opts)
    assert m["auc"] == m["auc/click"] == ref_click["auc"] and m["auc/true"] == ref_true["auc"]
    assert m["uauc/click"] == ref_click["gauc"] and m["uauc/true"] == ref_true["gauc"]
    assert m["logloss/true"] == ref_true["logloss"] and m["eval_samples/click"] == int(exposed.sum())
    for k in ("request_auc/click", "recall@2/true", "ndcg@1/click", "ndcg@2", "requests/true"):
        assert m[k] == rank[k], k
    assert m["auc/true"] != m["auc/click"]  # the mask matters
    # The per-user AUC really groups by user: grouping by request instead gives ranking's GAUC by request.
    by_request = preranking_metrics(logits, labels, r, ["click", "true"], mask, opts)
    assert by_request["uauc/true"] == ctr_metrics(logits[:, 1:], labels[:, 1:], r, ["true"])["gauc"]
    assert by_request["uauc/true"] != m["uauc/true"]
    assert "uauc: the train module gave no users; per-user AUC groups by request" in by_request["notes"]
    with pytest.raises(ValueError, match="users"):
        preranking_metrics(logits, labels, r, ["click", "true"], mask, opts, users=users[:3])
