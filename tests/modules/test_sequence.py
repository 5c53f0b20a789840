import pytest
import torch

from modules.sequence import last_n, masked_mean


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
