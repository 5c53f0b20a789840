import pytest
import torch

from modules.sequence import jagged_offsets, jagged_topk, last_n, masked_mean, pad_jagged, select_jagged


def _jagged(rows: list[list[float]], dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [S, D] whose row r, item i is (r * 100 + v) in every column, and lengths [B]."""
    values = [[float(v)] * dim for row in rows for v in row]
    return torch.tensor(values, dtype=torch.float32).reshape(-1, dim), torch.tensor([len(r) for r in rows])


ROWS = [[1, 2, 3, 4, 5], [], [7], [8, 9, 10]]


def test_last_n_left_aligned_keeps_most_recent_tail():
    values, lengths = _jagged(ROWS)
    padded, mask = last_n(values, lengths, 3)
    assert padded.shape == (4, 3, 3) and mask.shape == (4, 3)
    expected = torch.tensor([[3, 4, 5], [0, 0, 0], [7, 0, 0], [8, 9, 10]], dtype=torch.float32)
    torch.testing.assert_close(padded[..., 0], expected)
    torch.testing.assert_close(padded[..., 2], expected)
    assert mask.tolist() == [[True] * 3, [False] * 3, [True, False, False], [True] * 3]


def test_last_n_right_aligned_puts_most_recent_last():
    values, lengths = _jagged(ROWS)
    padded, mask = last_n(values, lengths, 4, right_aligned=True)
    expected = torch.tensor([[2, 3, 4, 5], [0, 0, 0, 0], [0, 0, 0, 7], [0, 8, 9, 10]], dtype=torch.float32)
    torch.testing.assert_close(padded[..., 1], expected)
    assert mask.tolist() == [[True] * 4, [False] * 4, [False, False, False, True], [False, True, True, True]]


def test_last_n_matches_python_reference_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 12, (17,), generator=gen)
    values = torch.randn(int(lengths.sum()), 5, generator=gen)
    n = 6
    padded, mask = last_n(values, lengths, n)
    start = 0
    for b, length in enumerate(lengths.tolist()):
        tail = values[start : start + length][-n:] if length else values[:0]
        start += length
        torch.testing.assert_close(padded[b, : len(tail)], tail)
        assert torch.all(padded[b, len(tail) :] == 0)
        assert mask[b].tolist() == [True] * len(tail) + [False] * (n - len(tail))


def test_last_n_on_1d_ids_int32_lengths_and_empty_batch():
    ids = torch.tensor([5, 6, 7, 8])
    padded, mask = last_n(ids, torch.tensor([3, 1], dtype=torch.int32), 2)
    assert padded.tolist() == [[6, 7], [8, 0]]
    assert mask.tolist() == [[True, True], [True, False]]
    padded, mask = last_n(torch.empty(0, 4), torch.zeros(3, dtype=torch.long), 2)
    assert padded.shape == (3, 2, 4) and not mask.any() and torch.all(padded == 0)


def test_last_n_gradient_reaches_only_kept_behaviours():
    values, lengths = _jagged(ROWS)
    values.requires_grad_(True)
    padded, _ = last_n(values, lengths, 2)
    padded.sum().backward()
    kept = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float32)  # row 0: 4, 5; row 2: 7; row 3: 9, 10
    torch.testing.assert_close(values.grad, kept.unsqueeze(1).expand(-1, 3))


def test_last_n_is_an_fx_leaf_and_runs_on_meta():
    class M(torch.nn.Module):
        def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            padded, mask = last_n(values, lengths, 3)
            return masked_mean(padded, mask)

    gm = torch.fx.symbolic_trace(M())
    assert any(n.op == "call_function" and n.target.__name__ == "_last_n" for n in gm.graph.nodes)
    values, lengths = _jagged(ROWS)
    torch.testing.assert_close(gm(values, lengths), M()(values, lengths))
    padded, mask = last_n(torch.empty(9, 4, device="meta"), torch.empty(4, dtype=torch.long, device="meta"), 3)
    assert padded.shape == (4, 3, 4) and mask.shape == (4, 3)


def test_last_n_rejects_nonpositive_n():
    with pytest.raises(ValueError):
        last_n(torch.zeros(1, 2), torch.ones(1, dtype=torch.long), 0)


def test_masked_mean_ignores_padding_even_if_nonfinite():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]], [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def _padded_topk_reference(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk on a padded [B, L_max] matrix; recency tiebreak by a tiny bonus for later positions.

    Scores are integers, so ``score + position / (L_max + 1)`` orders by score, then by position (later
    first) exactly; padding is -inf and never chosen before a real behaviour.
    """
    b, l_max = lengths.numel(), max(int(lengths.max()), k)
    offsets = jagged_offsets(lengths)
    pos = torch.arange(l_max)
    real = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, L_max]
    flat = offsets.unsqueeze(1) + pos.unsqueeze(0)  # [B, L_max]
    padded = torch.full((b, l_max), float("-inf"), dtype=torch.float64)
    padded[real] = scores.double()[flat[real]] + (pos.double() / (l_max + 1)).expand(b, -1)[real]
    top = torch.topk(padded, k, dim=1).indices  # [B, K] positions, best first
    valid = torch.gather(real, 1, top)
    return torch.where(valid, torch.gather(flat, 1, top), torch.full_like(top, -1)), valid


def test_jagged_topk_by_hand_descending_ties_to_the_most_recent():
    # Row 0: scores 1, 3, 3, 2 (flat 0..3): 3 at flat 2 (later) before 3 at flat 1, then 2 at flat 3.
    # Row 1: empty. Row 2: one behaviour (flat 4), K = 3 > its length. Row 3: all ties: latest first.
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 5.0, 0.0, 0.0, 0.0])
    indices, valid = jagged_topk(scores, torch.tensor([4, 0, 1, 3]), 3)
    assert indices.tolist() == [[2, 1, 3], [-1, -1, -1], [4, -1, -1], [7, 6, 5]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [True, False, False], [True] * 3]
    assert indices.dtype == torch.long and valid.dtype == torch.bool


@pytest.mark.parametrize("k", [1, 4, 9])
def test_jagged_topk_matches_padded_reference_with_many_ties(k: int):
    gen = torch.Generator().manual_seed(k)
    lengths = torch.randint(0, 12, (40,), generator=gen)
    lengths[:3] = 0  # empty rows, incl. the first
    scores = torch.randint(-3, 4, (int(lengths.sum()),), generator=gen).float()  # 7 values: many ties
    got = jagged_topk(scores, lengths.to(torch.int32), k)
    expected = _padded_topk_reference(scores, lengths, k)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_jagged_topk_on_rows_of_10_5_behaviours():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([100_000, 0, 3, 99_999])
    scores = torch.randint(0, 50, (int(lengths.sum()),), generator=gen).float()  # ~2000 ties per value
    got = jagged_topk(scores, lengths, 64)
    expected = _padded_topk_reference(scores, lengths, 64)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[1].sum(1).tolist() == [64, 0, 3, 64]


def test_jagged_topk_edge_cases_and_no_gradient():
    indices, valid = jagged_topk(torch.empty(0), torch.zeros(3, dtype=torch.long), 2)  # S = 0
    assert indices.tolist() == [[-1, -1]] * 3 and not valid.any()
    indices, valid = jagged_topk(torch.empty(0), torch.zeros(0, dtype=torch.long), 2)  # B = 0
    assert indices.shape == (0, 2) and valid.shape == (0, 2)
    scores = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    indices, valid = jagged_topk(scores, torch.tensor([3]), 2)
    assert indices.tolist() == [[1, 2]] and not indices.requires_grad
    long_scores = torch.tensor([4, 9, 9, 1])  # integer scores work too
    assert jagged_topk(long_scores, torch.tensor([2, 2]), 1)[0].tolist() == [[1], [2]]
    with pytest.raises(ValueError):
        jagged_topk(scores, torch.tensor([3]), 0)


def test_select_jagged_gathers_topk_and_zeroes_padding():
    values, lengths = _jagged(ROWS)  # rows [1..5], [], [7], [8, 9, 10]
    values.requires_grad_(True)
    indices, valid = jagged_topk(values[:, 0].detach(), lengths, 2)
    selected, mask = select_jagged(values, lengths, indices, valid)
    assert selected.shape == (4, 2, 3) and torch.equal(mask, valid)
    expected = torch.tensor([[5, 4], [0, 0], [7, 0], [10, 9]], dtype=torch.float32)
    torch.testing.assert_close(selected[..., 1], expected)
    selected.sum().backward()
    chosen = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float32)  # 4, 5, 7, 9, 10
    torch.testing.assert_close(values.grad, chosen.unsqueeze(1).expand(-1, 3))


def test_select_jagged_masks_indices_outside_their_row():
    values, lengths = _jagged(ROWS)
    offsets = jagged_offsets(lengths)
    assert offsets.tolist() == [0, 5, 5, 6]
    positions = torch.tensor([[0, 4], [0, 0], [0, 1], [2, -1]])  # row positions; [2, 1], [3, 1] out of range
    indices = offsets.unsqueeze(1) + positions
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    selected, mask = select_jagged(values, lengths, indices, valid)
    assert mask.tolist() == [[True, True], [False, False], [True, False], [True, False]]
    torch.testing.assert_close(selected[..., 0], torch.tensor([[1.0, 5.0], [0, 0], [7, 0], [10, 0]]))
    ids, _ = select_jagged(torch.arange(9), lengths, indices, valid)  # 1-D values
    assert ids.tolist() == [[0, 4], [0, 0], [5, 0], [8, 0]]


def test_topk_and_select_are_fx_leaves_and_run_on_meta():
    class M(torch.nn.Module):
        def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            indices, valid = jagged_topk(values.sum(-1), lengths, 2)
            selected, mask = select_jagged(values, lengths, indices, valid)
            return masked_mean(selected, mask)

    gm = torch.fx.symbolic_trace(M())
    leaves = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"}
    assert {"_jagged_topk", "_select_jagged"} <= leaves
    values, lengths = _jagged(ROWS)
    torch.testing.assert_close(gm(values, lengths), M()(values, lengths))
    indices, valid = jagged_topk(torch.empty(9, device="meta"), torch.empty(4, dtype=torch.long, device="meta"), 3)
    assert indices.shape == (4, 3) and valid.shape == (4, 3) and indices.dtype == torch.long


@pytest.mark.parametrize("uneven", [False, True])
def test_jagged_topk_both_algorithms_match_the_reference(uneven: bool):
    """Rows of similar lengths take the per-row top-k over int64 keys, very uneven rows the two stable sorts:
    the same indices (negative scores, -0.0 vs 0.0, infinities and many ties included)."""
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(50, 60, (30,), generator=gen)
    if uneven:
        lengths[0] = 20_000  # B * L_max far above 2 S: the sort path
    values = torch.tensor([-2.5, -1.0, -0.0, 0.0, 1.0, 3.0, float("inf"), float("-inf")])
    scores = values[torch.randint(0, len(values), (int(lengths.sum()),), generator=gen)]
    got, valid = jagged_topk(scores, lengths, 7)
    offsets = jagged_offsets(lengths).tolist()
    for b, n in enumerate(lengths.tolist()):  # plain Python: by (score, position), both descending
        row = scores[offsets[b]:offsets[b] + n].tolist()
        want = sorted(range(n), key=lambda p: (row[p], p), reverse=True)[:7]
        assert got[b].tolist() == [offsets[b] + p for p in want], b
    assert valid.all()


def test_pad_jagged_pads_left_aligned_and_views_full_rows():
    values = torch.arange(12.0).view(6, 2)
    padded, mask = pad_jagged(values, torch.tensor([2, 0, 3, 1]))
    assert padded.shape == (4, 3, 2) and mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert torch.equal(padded[mask], values) and torch.all(padded[~mask] == 0)
    full, full_mask = pad_jagged(values, torch.tensor([3, 3]))  # every row full: a view, nothing padded
    assert full.shape == (2, 3, 2) and bool(full_mask.all()) and torch.equal(full[full_mask], values)
    assert full.data_ptr() == values.data_ptr()
    one, one_mask = pad_jagged(values, torch.tensor([6]))  # one request
    assert torch.equal(one[0], values) and bool(one_mask.all())
    empty, empty_mask = pad_jagged(values[:0], torch.tensor([0, 0]))  # width at least 1
    assert empty.shape == (2, 1, 2) and not empty_mask.any() and torch.all(empty == 0)
