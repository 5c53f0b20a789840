import torch

from modules.target_attention import MultiHeadTargetAttention, TargetAttention, masked_softmax

B, L, D = 3, 5, 4
MASK = torch.tensor([[True, True, True, False, False], [False] * 5, [True] * 5])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randn(B, L, D, generator=gen)


def _din_reference(att: TargetAttention, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DIN Eq. 3 one behaviour at a time: sum_j a(e_j, v_A) e_j over valid j (softmax over valid j if asked)."""
    out = torch.zeros(query.shape)
    for b in range(query.size(0)):
        valid = [j for j in range(keys.size(1)) if mask[b, j]]
        scores = []
        for j in range(keys.size(1)):
            q, k = query[b], keys[b, j]
            scores.append(att.unit(torch.cat([q, k, q - k, q * k]).unsqueeze(0))[0, 0])
        if att.softmax and valid:
            z = sum(torch.exp(scores[j]) for j in valid)
            weights = {j: torch.exp(scores[j]) / z for j in valid}
        else:
            weights = {j: scores[j] for j in valid}
        for j in valid:
            out[b] += weights[j] * keys[b, j]
    return out


def test_target_attention_matches_naive_reference():
    query, keys = _inputs()
    for softmax in (False, True):
        att = TargetAttention(D, [6, 3], softmax=softmax)
        out = att(query, keys, MASK)
        assert out.shape == (B, D)
        torch.testing.assert_close(out, _din_reference(att, query, keys, MASK))
    assert torch.all(out[1] == 0)  # no valid behaviour


def test_target_attention_weights_are_not_normalised_by_default():
    query, keys = _inputs()
    att = TargetAttention(D, [6])
    keys = query.unsqueeze(1).expand(B, L, D).clone()  # every behaviour equals the target
    mask = torch.ones(B, L, dtype=torch.bool)
    score = att.scores(query, keys)[:, :1]  # [B, 1], identical for every j
    torch.testing.assert_close(att(query, keys, mask), L * score * query)


def test_target_attention_padding_neither_changes_output_nor_gets_gradient():
    query, base = _inputs()
    for softmax in (False, True):
        att = TargetAttention(D, [6, 3], softmax=softmax)
        keys = base.clone().requires_grad_(True)
        out = att(query, keys, MASK)
        other = keys.detach().clone()
        other[~MASK] = torch.randn(int((~MASK).sum()), D) * 100
        torch.testing.assert_close(att(query, other, MASK), out)
        out.sum().backward()
        assert torch.all(keys.grad[~MASK] == 0)
        assert torch.all(keys.grad[MASK].abs().sum(-1) > 0)


def _mhta_reference(att: MultiHeadTargetAttention, query, keys, mask, values, bias) -> torch.Tensor:
    """Per row, head and behaviour: softmax_j(q_h . k_hj / sqrt(d) + bias_hj) v_hj, heads concatenated, W_o."""
    h, d = att.num_heads, att.head_dim
    wq, wk, wv = att.w_q.weight, att.w_k.weight, att.w_v.weight
    rows = []
    for b in range(query.size(0)):
        heads = []
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            q = wq[sl] @ query[b]
            logits, vs = [], []
            for j in range(keys.size(1)):
                if not mask[b, j]:
                    continue
                k = wk[sl] @ keys[b, j]
                extra = 0.0 if bias is None else (bias[b, j] if bias.dim() == 2 else bias[b, i, j])
                logits.append(torch.dot(q, k) / d**0.5 + extra)
                vs.append(wv[sl] @ values[b, j])
            if logits:
                w = torch.softmax(torch.stack(logits), dim=0)
                heads.append((w.unsqueeze(1) * torch.stack(vs)).sum(0))
            else:
                heads.append(torch.zeros(d))
        rows.append(torch.cat(heads))
    return att.w_o(torch.stack(rows))


def test_multi_head_target_attention_matches_naive_reference():
    gen = torch.Generator().manual_seed(1)
    query, keys = torch.randn(B, 6, generator=gen), torch.randn(B, L, D, generator=gen)
    values = torch.randn(B, L, 7, generator=gen)
    att = MultiHeadTargetAttention(6, D, num_heads=2, head_dim=3, value_dim=7, output_dim=5)
    for bias in (None, torch.randn(B, L, generator=gen), torch.randn(B, 2, L, generator=gen)):
        out = att(query, keys, MASK, values=values, bias=bias)
        assert out.shape == (B, 5)
        torch.testing.assert_close(out, _mhta_reference(att, query, keys, MASK, values, bias))
    # Without W_o the output is the concatenated heads and the values default to the keys.
    att = MultiHeadTargetAttention(6, D, num_heads=2)
    assert att.out_features == D
    torch.testing.assert_close(att(query, keys, MASK), _mhta_reference(att, query, keys, MASK, keys, None))
    assert torch.all(att(query, keys, MASK)[1] == 0)


def test_multi_head_target_attention_padding_neither_changes_output_nor_gets_gradient():
    gen = torch.Generator().manual_seed(2)
    query, keys = torch.randn(B, D, generator=gen), torch.randn(B, L, D, generator=gen).requires_grad_(True)
    bias = torch.randn(B, 2, L, generator=gen).requires_grad_(True)
    att = MultiHeadTargetAttention(D, D, num_heads=2, output_dim=3)
    out = att(query, keys, MASK, bias=bias)
    other_keys, other_bias = keys.detach().clone(), bias.detach().clone()
    other_keys[~MASK] = 1e3
    other_bias.transpose(1, 2)[~MASK] = 1e3
    torch.testing.assert_close(att(query, other_keys, MASK, bias=other_bias), out)
    out.sum().backward()
    assert torch.all(keys.grad[~MASK] == 0) and torch.all(bias.grad.transpose(1, 2)[~MASK] == 0)
    assert torch.isfinite(keys.grad).all() and torch.all(keys.grad[MASK].abs().sum(-1) > 0)


def test_attention_modules_trace_with_fx():
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.din = TargetAttention(D, [4], softmax=True)
            self.din_top = TargetAttention(D, [4], softmax=True, top_k=2)  # the top-k cut traces too
            self.mhta = MultiHeadTargetAttention(D, D, num_heads=2, output_dim=3)

        def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor):
            return self.din(query, keys, mask), self.din_top(query, keys, mask), self.mhta(query, keys, mask, bias=bias)

    m = M()
    gm = torch.fx.symbolic_trace(m)
    query, keys = _inputs()
    bias = torch.randn(B, L)
    for got, want in zip(gm(query, keys, MASK, bias), m(query, keys, MASK, bias)):
        torch.testing.assert_close(got, want)


def test_masked_softmax_all_masked_row_is_zero_without_nan_gradient():
    scores = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_softmax(scores, mask)
    torch.testing.assert_close(w.sum(-1), torch.tensor([1.0, 0.0]))
    (w * torch.arange(3.0)).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[~mask] == 0)


def test_attention_builds_on_meta():
    att = MultiHeadTargetAttention(D, D, num_heads=2, output_dim=3, device=torch.device("meta"))
    din = TargetAttention(D, [4], device=torch.device("meta"))
    assert all(p.is_meta for p in list(att.parameters()) + list(din.parameters()))
    out = att(torch.empty(B, D, device="meta"), torch.empty(B, L, D, device="meta"), MASK.to("meta"))
    assert out.shape == (B, 3)


def test_factorized_target_attention_equals_the_concatenated_form():
    """Same parameters, same scores, outputs and gradients (to float rounding), with and without softmax."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 6, generator=g), torch.randn(5, 9, 6, generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.3
    for softmax in (False, True):
        torch.manual_seed(0)
        plain = TargetAttention(6, (7, 4), softmax=softmax)
        fact = TargetAttention(6, (7, 4), softmax=softmax, factorized=True)
        fact.load_state_dict(plain.state_dict())
        assert fact.scores(q, k).shape == (5, 9)
        torch.testing.assert_close(fact.scores(q, k), plain.scores(q, k), atol=1e-5, rtol=1e-5)
        out_p, out_f = plain(q, k, mask), fact(q, k, mask)
        torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
        out_p.sum().backward()
        out_f.sum().backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), fact.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
    # a changed weight changes the factorized scores too (the split reads the live parameters)
    with torch.no_grad():
        fact.unit.layers[0].weight[:, 18:].add_(1.0)
    assert not torch.allclose(fact.scores(q, k), plain.scores(q, k), atol=1e-3)


def test_top_k_target_attention_is_softmax_over_the_k_best_scores():
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=[8], softmax=True, top_k=3)
    query, keys = torch.randn(2, 4), torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    out = att(query, keys, mask)
    scores = att.scores(query, keys)
    best = scores[0].topk(3).indices
    w0 = torch.softmax(scores[0, best], dim=0)
    torch.testing.assert_close(out[0], (w0.unsqueeze(-1) * keys[0, best]).sum(0))
    # A row with fewer than k behaviours keeps them all, and padding stays out.
    w1 = torch.softmax(scores[1, :2], dim=0)
    torch.testing.assert_close(out[1], (w1.unsqueeze(-1) * keys[1, :2]).sum(0))
    # Behaviours outside the top k get no gradient.
    keys.requires_grad_(True)
    att(query, keys, mask).sum().backward()
    dropped = [j for j in range(6) if j not in best.tolist()]
    assert keys.grad[0, dropped].abs().sum() == 0 and keys.grad[0, best].abs().sum() > 0
    assert keys.grad[1, 2:].abs().sum() == 0
    # k >= L keeps every behaviour.
    full = TargetAttention(4, hidden=[8], softmax=True, top_k=6)
    full.load_state_dict(att.state_dict())
    plain = TargetAttention(4, hidden=[8], softmax=True)
    plain.load_state_dict(att.state_dict())
    torch.testing.assert_close(full(query, keys, mask), plain(query, keys, mask))
