"""The GSU's ranking (modules/search.py GeneralSearchUnit, modules/sequence.py jagged_topk) against a plain
reference of TWIN Eq. 8's head mean: every path chooses the same indices, ties included.

The reference computes, per row and behaviour, ``mean_h <k_h, q_h> + mean_h sum_j (K_c^j . w_c^j) beta_jh``
in float64 one row at a time and orders by (score, position) descending in plain Python. With inputs that are
small multiples of 1/4 every sum is exact in float32 whatever its order, so the scores must be bit-equal and
the many ties (a few distinct values) test the tie rule; continuous inputs test the rounding on top.
"""

from __future__ import annotations

import math

import pytest
import torch

from modules.search import GeneralSearchUnit, TwinRelevance, unique_items
from modules.sequence import jagged_offsets, jagged_topk

I_H, H, DK, K = 12, 4, 6, 20
CROSS_DIMS = [4, 1, 3]


def _reference(keys: torch.Tensor, query: torch.Tensor, cross: torch.Tensor, rel: TwinRelevance,
               lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, list[list[int]]]:
    """``(scores [S] float64, per row the flat indices of its top k)`` by today's formula, row by row."""
    w_c, beta = rel.w_c.detach().double(), rel.beta.detach().double()
    scores, tops = [], []
    for b, (start, n) in enumerate(zip(jagged_offsets(lengths).tolist(), lengths.tolist())):
        kb = keys[start:start + n].double().view(n, H, DK)  # [L, H, d_k]
        alpha = (kb * query[b].double()).sum(-1)  # [L, H]
        c = cross[start:start + n].double()
        bounds = [0] + [sum(CROSS_DIMS[:j + 1]) for j in range(len(CROSS_DIMS))]
        projected = torch.stack([(c[:, lo:hi] * w_c[lo:hi]).sum(-1) for lo, hi in zip(bounds, bounds[1:])], -1)
        row = (alpha + projected @ beta).mean(-1)  # [L]
        scores.append(row)
        values = row.tolist()
        order = sorted(range(n), key=lambda p: (values[p], p), reverse=True)[:k]  # later first on ties
        tops.append([start + p for p in order])
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64), tops


def _quarters(shape: tuple[int, ...], g: torch.Generator, top: int = 4) -> torch.Tensor:
    return torch.randint(-top, top + 1, shape, generator=g).float() / 4  # exact sums in float32


def _case(lengths: list[int], seed: int, exact: bool, items: int = 40):
    """A relevance, its query and ``(lengths, ids, item table, inherent, cross)``; items repeat, and so do
    cross rows (7 distinct), so behaviours tie exactly."""
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *shape: _quarters(shape, g)) if exact else (lambda *shape: torch.randn(*shape, generator=g))
    rel = TwinRelevance(I_H, I_H, cross_dims=CROSS_DIMS, num_heads=H, head_dim=DK)
    with torch.no_grad():
        rel.w_h.weight.copy_(draw(H * DK, I_H))
        rel.w_c.copy_(draw(sum(CROSS_DIMS)))
        rel.beta.copy_(draw(len(CROSS_DIMS), H))
    lengths_t = torch.tensor(lengths)
    s = int(lengths_t.sum())
    ids = torch.randint(0, items, (s,), generator=g)
    table = draw(items, I_H)
    cross = draw(7, sum(CROSS_DIMS))[torch.randint(0, 7, (s,), generator=g)]
    query = draw(len(lengths), H, DK)  # [B, H, d_k] (as relevance.query gives it)
    return rel, query, lengths_t, ids, table, table[ids], cross


def _paths(rel, query, lengths, ids, table, inherent, cross, k):
    gsu = GeneralSearchUnit(rel, top_k=k)
    with torch.no_grad():
        cache = rel.w_h(table)  # [items, H d_k]
    return {
        "naive": gsu(query, lengths, cross=cross, inherent=inherent),
        "distinct": gsu(query, lengths, cross=cross, inherent=inherent, items=unique_items(ids)),
        "folded": gsu(query, lengths, cross=cross, inherent=inherent, fold=True),
        "cached": gsu(query, lengths, cross=cross, cached_keys=cache[ids]),
    }


def _check_indices(result, tops: list[list[int]], lengths: torch.Tensor, k: int, name: str) -> None:
    for b, n in enumerate(lengths.tolist()):
        assert result.indices[b, : min(n, k)].tolist() == tops[b], (name, b)
        assert (result.indices[b, min(n, k):] == -1).all() and result.valid[b].sum() == min(n, k), (name, b)


@pytest.mark.parametrize("lengths", [
    [300],  # one request (serving)
    [5],  # one request shorter than K
    [200, 200, 200],  # several requests, equal rows
    [0, 3, 150, 0, 1, 260],  # empty, short and long rows
    [100_000],  # one request of 10^5 behaviours
    [100_000, 7, 100_000],  # 10^5 rows beside a short one (chunked row sums)
    [30_000, 30_000],  # equal rows, chunked row sums
])
def test_every_path_ranks_exactly_like_the_reference(lengths):
    rel, query, lens, ids, table, inherent, cross = _case(lengths, seed=len(lengths), exact=True)
    with torch.no_grad():
        keys = rel.w_h(inherent)  # [S, H d_k]
    ref_scores, tops = _reference(keys, query, cross, rel, lens, K)
    assert len(ref_scores) < 100 or len(set(ref_scores.tolist())) < 0.9 * len(ref_scores)  # ties abound
    for name, res in _paths(rel, query, lens, ids, table, inherent, cross, K).items():
        assert torch.equal(res.scores.double(), ref_scores), name  # exact inputs: bit-equal scores
        _check_indices(res, tops, lens, K, name)


@pytest.mark.parametrize("lengths", [[2000], [600, 0, 9, 1500]])
def test_continuous_inputs_choose_the_reference_indices(lengths):
    rel, query, lens, ids, table, inherent, cross = _case(lengths, seed=7, exact=False, items=5000)
    with torch.no_grad():
        keys = rel.w_h(inherent)
    ref_scores, tops = _reference(keys, query, cross, rel, lens, K)
    # The chosen scores are apart by far more than float32 rounding (~1e-6 here): the comparison is meaningful.
    for b, top in enumerate(tops):
        start, n = int(jagged_offsets(lens)[b]), int(lens[b])
        ranked = sorted(ref_scores[start:start + n].tolist(), reverse=True)[: K + 1]
        assert all(x - y > 1e-4 for x, y in zip(ranked, ranked[1:])), b
    for name, res in _paths(rel, query, lens, ids, table, inherent, cross, K).items():
        torch.testing.assert_close(res.scores.double(), ref_scores, rtol=1e-5, atol=1e-5)
        _check_indices(res, tops, lens, K, name)


def test_several_requests_score_repeated_behaviours_bit_equal():
    """For B > 1 a behaviour's score depends on its own row alone: repeats of an (item, cross) pair tie exactly
    and the most recent repeat ranks first, as the tie rule says."""
    rel, query, lens, ids, table, inherent, cross = _case([700, 333, 1], seed=3, exact=False, items=6)
    for name, res in _paths(rel, query, lens, ids, table, inherent, cross, K).items():
        for b, (start, n) in enumerate(zip(jagged_offsets(lens).tolist(), lens.tolist())):
            groups: dict[tuple, set[float]] = {}
            for p in range(start, start + n):
                groups.setdefault((int(ids[p]), *cross[p].tolist()), set()).add(float(res.scores[p]))
            assert all(len(v) == 1 for v in groups.values()), (name, b)
            assert n < 50 or len(groups) < n / 2  # repeats abound
            chosen = res.indices[b][res.valid[b]].tolist()
            for i, j in zip(chosen, chosen[1:]):  # equal scores: the later behaviour first
                assert res.scores[i] > res.scores[j] or (res.scores[i] == res.scores[j] and i > j), (name, b)


def _plain_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> list[list[int]]:
    """Per row by (score, position) descending in Python; NaN above +inf, -0.0 equal to 0.0."""
    out = []
    for start, n in zip(jagged_offsets(lengths).tolist(), lengths.tolist()):
        row = scores[start:start + n].tolist()
        key = [(1, 0.0, p) if math.isnan(x) else (0, x, p) for p, x in enumerate(row)]
        order = sorted(range(n), key=lambda p: key[p], reverse=True)[:k]
        out.append([start + p for p in order] + [-1] * (k - len(order)))
    return out


@pytest.mark.parametrize("rows,length", [(1, 1), (1, 37), (1, 5000), (4, 300), (3, 20)])
@pytest.mark.parametrize("kind", ["continuous", "ties", "specials"])
def test_jagged_topk_equal_rows_match_the_plain_order(rows: int, length: int, kind: str):
    """Equal rows (one request above all) take one float top-k and order only the chosen; ties within the
    chosen, ties across the cut, NaN, infinities and -0.0 must give the plain (score, position) order."""
    g = torch.Generator().manual_seed(rows * 1000 + length)
    s = rows * length
    if kind == "continuous":
        scores = torch.randn(s, generator=g)
    elif kind == "ties":
        scores = torch.randint(0, 6, (s,), generator=g).float()  # ties within and across the cut
    else:
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.0])
        scores = specials[torch.randint(0, len(specials), (s,), generator=g)]
    lengths = torch.full((rows,), length)
    for k in (1, 10, 64, length + 3):
        indices, valid = jagged_topk(scores, lengths, k)
        assert indices.tolist() == _plain_topk(scores, lengths, k), (kind, k)
        assert valid.sum(1).tolist() == [min(k, length)] * rows


def test_jagged_topk_one_request_tie_only_inside_the_chosen():
    # The 3 best are 5, 5, 4 (a tie inside, none across the cut at 4 > 3): the later 5 first.
    scores = torch.tensor([5.0, 1.0, 4.0, 5.0, 3.0, 3.0])
    assert jagged_topk(scores, torch.tensor([6]), 3)[0].tolist() == [[3, 0, 2]]
    # A tie across the cut (3, 3 for the 4th slot): the later 3 is taken.
    assert jagged_topk(scores, torch.tensor([6]), 4)[0].tolist() == [[3, 0, 2, 5]]
    # NaN first, then +inf, whatever their positions.
    special = torch.tensor([float("inf"), 0.0, float("nan"), -0.0])
    assert jagged_topk(special, torch.tensor([4]), 4)[0].tolist() == [[2, 0, 3, 1]]
