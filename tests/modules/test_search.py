"""CP-GSU and ESU (modules/search.py): consistency, the three key paths, masks, parity with full attention."""

from __future__ import annotations

import torch

from modules.search import (
    ExactSearchUnit,
    GeneralSearchUnit,
    TwinRelevance,
    gather_survivors,
    row_ids,
    unique_items,
)
from modules.sequence import jagged_offsets, last_n
from modules.target_attention import MultiHeadTargetAttention

I_H, I_C, D_Q, H, DK = 12, 5, 12, 4, 6


def _setup(lengths, seed=0, top_k=100, items=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    s = int(lengths.sum())
    rel = TwinRelevance(I_H, D_Q, cross_dims=[4, 1], num_heads=H, head_dim=DK)
    torch.manual_seed(seed)
    rel.reset_parameters()
    with torch.no_grad():
        rel.beta.copy_(torch.randn(2, H, generator=g))
    ids = torch.randint(1, items, (s,), generator=g)
    table = torch.randn(items, I_H, generator=g)
    inherent = table[ids]  # [S, I_h]: a function of the item
    cross = torch.randn(s, I_C, generator=g)
    target = torch.randn(len(lengths), D_Q, generator=g)
    gsu = GeneralSearchUnit(rel, top_k=top_k)
    esu = ExactSearchUnit(rel, value_dim=I_H + I_C, output_dim=7)
    return rel, gsu, esu, lengths, ids, inherent, cross, target


def _brute_scores(rel, inherent, cross, target, lengths):
    """Per row, alpha of every behaviour computed one row at a time (no batching tricks): [S, H]."""
    out = []
    offsets = jagged_offsets(lengths)
    for b in range(len(lengths)):
        sl = slice(int(offsets[b]), int(offsets[b] + lengths[b]))
        q = rel.w_q(target[b]) / DK**0.5  # [H d_k]
        k = rel.w_h(inherent[sl])  # [L, H d_k]
        alpha = (k.view(-1, H, DK) * q.view(H, DK)).sum(-1)  # [L, H]
        c = cross[sl]
        bias = torch.stack([(c[:, :4] * rel.w_c[:4]).sum(-1), c[:, 4] * rel.w_c[4]], dim=-1) @ rel.beta  # [L, H]
        out.append(alpha + bias)
    return torch.cat(out)


def test_gsu_keeps_the_exact_top_k_of_the_esu_relevance():
    rel, gsu, _, lengths, ids, inherent, cross, target = _setup([150, 40, 0, 101, 7], top_k=20)
    res = gsu(rel.query(target), lengths, cross=cross, inherent=inherent)
    score = _brute_scores(rel, inherent, cross, target, lengths).mean(-1)  # [S]
    torch.testing.assert_close(res.scores, score, rtol=1e-5, atol=1e-5)
    offsets = jagged_offsets(lengths)
    for b, n in enumerate(lengths.tolist()):
        got = res.indices[b][res.valid[b]].tolist()
        assert len(got) == min(n, 20) and res.valid[b].sum() == min(n, 20)
        row = score[int(offsets[b]):int(offsets[b]) + n]
        want = (torch.argsort(row, descending=True, stable=True)[: min(n, 20)] + offsets[b]).tolist()
        assert got == want, b
        assert (res.indices[b][~res.valid[b]] == -1).all()


def test_distinct_item_and_cached_keys_give_the_naive_scores():
    rel, gsu, _, lengths, ids, inherent, cross, target = _setup([300, 1, 250], top_k=50, items=20)
    q = rel.query(target)
    naive = gsu(q, lengths, cross=cross, inherent=inherent)
    first, inverse = unique_items(ids)
    assert len(first) <= 19 and torch.equal(ids[first][inverse], ids)
    distinct = gsu(q, lengths, cross=cross, inherent=inherent, items=(first, inverse))
    cache = rel.w_h(torch.randn(0, I_H)).new_zeros(20, H * DK)  # one row per item id
    with torch.no_grad():
        cache[ids] = rel.w_h(inherent)
    cached = gsu(q, lengths, cross=cross, cached_keys=cache[ids])
    for other in (distinct, cached):
        torch.testing.assert_close(other.scores, naive.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(other.indices, naive.indices)


def test_unique_items_over_several_columns():
    ids = torch.tensor([[3, 1], [2, 1], [3, 1], [3, 2], [2, 1]])
    first, inverse = unique_items(ids)
    assert torch.equal(ids[first][inverse], ids)
    assert sorted(first.tolist()) == [0, 1, 3]
    assert inverse[0] == inverse[2] and inverse[1] == inverse[4] and len(set(inverse.tolist())) == 3
    f0, i0 = unique_items(torch.zeros(0, 2, dtype=torch.long))
    assert f0.numel() == 0 and i0.numel() == 0


def test_esu_with_k_equal_l_is_full_multi_head_target_attention():
    rel, gsu, esu, lengths, ids, inherent, cross, target = _setup([9, 4, 12], top_k=12)
    values = torch.cat([inherent, cross], dim=-1)  # [S, D_v]
    q = rel.query(target)
    res = gsu(q, lengths, cross=cross, inherent=inherent)
    sel_inh, mask = gather_survivors(inherent, lengths, res)
    sel_val, _ = gather_survivors(values, lengths, res)
    sel_cross, _ = gather_survivors(cross, lengths, res)
    out = esu(q, sel_inh, sel_val, mask, cross=sel_cross)  # [B, 7]

    mha = MultiHeadTargetAttention(D_Q, I_H, num_heads=H, head_dim=DK, value_dim=I_H + I_C, output_dim=7)
    with torch.no_grad():
        mha.w_q.weight.copy_(rel.w_q.weight)
        mha.w_k.weight.copy_(rel.w_h.weight)
        mha.w_v.weight.copy_(esu.w_v.weight)
        mha.w_o.weight.copy_(esu.w_o.weight)
        mha.w_o.bias.copy_(esu.w_o.bias)
    keys, pad_mask = last_n(inherent, lengths, 12)  # [B, L, I_h]
    vals, _ = last_n(values, lengths, 12)
    bias_flat = rel.cross_bias(cross)  # [S, H]
    bias, _ = last_n(bias_flat, lengths, 12)  # [B, L, H]
    want = mha(target, keys, pad_mask, values=vals, bias=bias.transpose(1, 2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_empty_and_short_histories_are_masked():
    rel, gsu, esu, lengths, ids, inherent, cross, target = _setup([0, 3, 150], top_k=100)
    values = torch.cat([inherent, cross], dim=-1)
    q = rel.query(target)
    res = gsu(q, lengths, cross=cross, inherent=inherent)
    assert res.valid.sum(1).tolist() == [0, 3, 100]
    sel_inh, mask = gather_survivors(inherent, lengths, res)
    sel_val, _ = gather_survivors(values, lengths, res)
    sel_cross, _ = gather_survivors(cross, lengths, res)
    out = esu(q, sel_inh, sel_val, mask, cross=sel_cross)
    torch.testing.assert_close(out[0], esu.w_o.bias)  # no behaviour: W_o 0
    # The short row attends over exactly its 3 behaviours: changing a padding slot's content changes nothing.
    sel_val2 = sel_val.clone()
    sel_val2[1, 3:] = 1e3
    out2 = esu(q, sel_inh, sel_val2, mask, cross=sel_cross)
    torch.testing.assert_close(out2, out)
    # All-empty batch.
    empty = gsu(q[:1], torch.tensor([0]), cross=cross[:0], inherent=inherent[:0])
    assert empty.indices.tolist() == [[-1] * 100] and not empty.valid.any()


def test_gradients_flow_through_the_esu_only():
    rel, gsu, esu, lengths, ids, inherent, cross, target = _setup([30, 5], top_k=8)
    inherent = inherent.clone().requires_grad_(True)
    values = torch.cat([inherent, cross], dim=-1)
    q = rel.query(target)
    res = gsu(q, lengths, cross=cross, inherent=inherent)
    assert not res.scores.requires_grad
    sel_inh, mask = gather_survivors(inherent, lengths, res)
    sel_val, _ = gather_survivors(values, lengths, res)
    sel_cross, _ = gather_survivors(cross, lengths, res)
    esu(q, sel_inh, sel_val, mask, cross=sel_cross).sum().backward()
    for p in (rel.w_h.weight, rel.w_q.weight, rel.w_c, rel.beta, esu.w_v.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    touched = inherent.grad.abs().sum(-1) > 0  # [S]
    chosen = set(res.indices[res.valid].tolist())
    assert set(torch.nonzero(touched).flatten().tolist()) == chosen  # only survivors get gradient


def test_row_ids():
    assert row_ids(torch.tensor([2, 0, 3]), 5).tolist() == [0, 0, 2, 2, 2]


def test_unique_items_folded_keys_match_the_row_wise_unique():
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randint(0, 50, (400,), generator=g), torch.randint(0, 7, (400,), generator=g)], 1)
    f1, i1 = unique_items(ids)
    f2, i2 = unique_items(ids, sizes=[50, 7])
    assert torch.equal(ids[f2][i2], ids) and len(f1) == len(f2)
    assert sorted(map(tuple, ids[f1].tolist())) == sorted(map(tuple, ids[f2].tolist()))
