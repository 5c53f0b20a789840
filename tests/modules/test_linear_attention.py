import math

import pytest
import torch

from modules.linear_attention import (
    FEATURE_MAPS,
    AttentionKind,
    FeatureMap,
    SetLinearAttention,
    linear_attention,
    linear_attention_quadratic,
)
from modules.folded_head import score_folded
from modules.mlp import MLP

B, M, N, DQ, DK, DV, MODEL = 3, 5, 7, 6, 4, 3, 8
# request 0: 3 real candidates, 4 real keys; request 1: no valid key; request 2: everything real
QUERY_MASK = torch.tensor([[True] * 3 + [False] * 2, [True, False, True, True, False], [True] * 5])
KEY_MASK = torch.tensor([[True, False, True, True, False, True, False], [False] * 7, [True] * 7])


def _inputs(seed: int = 0, m: int = M, n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, DQ, generator=g), torch.randn(B, n, DK, generator=g), torch.randn(B, n, DV, generator=g)


def _module(heads: int = 2, feature_map: FeatureMap = FeatureMap.elu1, attention=AttentionKind.linear, seed=0):
    torch.manual_seed(seed)
    return SetLinearAttention(DQ, DK, DV, MODEL, heads=heads, feature_map=feature_map, attention=attention)


def _naive(att: SetLinearAttention, query, key, value, query_mask, key_mask) -> torch.Tensor:
    """DUET's E = D^-1 phi(Q) phi(K)^T V one request, head and candidate at a time, then W_o; 0 on padding."""
    h, d = att.heads, att.head_dim
    phi = FEATURE_MAPS[att.feature_map]
    out = torch.zeros(query.size(0), query.size(1), att.model_dim)
    for b in range(query.size(0)):
        valid = [j for j in range(key.size(1)) if key_mask[b, j]]
        for i in range(query.size(1)):
            if not query_mask[b, i] or not valid:
                continue
            heads = []
            for hh in range(h):
                sl = slice(hh * d, (hh + 1) * d)
                q = phi(att.w_q.weight[sl] @ query[b, i])
                num, den = torch.zeros(d), torch.zeros(())
                for j in valid:
                    a = q @ phi(att.w_k.weight[sl] @ key[b, j])  # one entry of phi(Q) phi(K)^T
                    num = num + a * (att.w_v.weight[sl] @ value[b, j])
                    den = den + a
                heads.append(num / (den + att.eps))
            out[b, i] = att.w_o(torch.cat(heads))
    return out


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("feature_map", list(FeatureMap))
def test_linear_equals_quadratic_form_and_naive_reference(heads, feature_map):
    query, key, value = _inputs()
    att = _module(heads, feature_map)
    q, k, v = att.project(query, key, value)
    fast = linear_attention(q, k, v, QUERY_MASK, KEY_MASK, feature_map, att.eps)
    assert fast.shape == (B, heads, M, MODEL // heads)
    slow = linear_attention_quadratic(q, k, v, QUERY_MASK, KEY_MASK, feature_map, att.eps)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert fast.abs().sum() > 0
    out = att(query, key, value, QUERY_MASK, KEY_MASK)  # the folded form (W_v, W_o inside phi(K)^T X_v)
    assert out.shape == (B, M, MODEL)
    unfolded = att.w_o(att.mix(query, key, value, QUERY_MASK, KEY_MASK).transpose(1, 2).reshape(B, M, MODEL))
    rows = QUERY_MASK & KEY_MASK.any(1, keepdim=True)
    torch.testing.assert_close(out[rows], unfolded[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _naive(att, query, key, value, QUERY_MASK, KEY_MASK), atol=1e-5, rtol=1e-5)
    assert torch.all(out[~QUERY_MASK] == 0) and torch.all(out[1] == 0)


def test_degree_normalisation_keeps_outputs_in_the_convex_hull_of_the_values():
    # c2c self-attention over 20,000 candidates with large positive inputs
    g = torch.Generator().manual_seed(1)
    x = 5.0 + 5.0 * torch.rand(1, 20_000, DQ, generator=g)
    mask = torch.ones(1, 20_000, dtype=torch.bool)
    att = SetLinearAttention(DQ, DQ, DQ, MODEL, heads=2)
    with torch.no_grad():
        heads = att.mix(x, x, x, mask, mask)  # [1, H, M, d]
        _, _, v = att.project(x, x, x)  # [1, H, N, d]
    bound = v.abs().amax(dim=2, keepdim=True)  # [1, H, 1, d]: max_j |V_j| per head and channel
    assert torch.isfinite(heads).all()
    assert torch.all(heads.abs() <= bound * (1 + 1e-5) + 1e-6)
    assert heads.abs().max() > 0.01 * bound.max()  # bounded, not collapsed to 0


def test_unnormalised_linear_attention_grows_with_the_number_of_keys_normalised_does_not():
    g = torch.Generator().manual_seed(2)
    query = 5.0 + 5.0 * torch.rand(1, 16, DQ, generator=g)
    base_key, base_value = 5.0 + 5.0 * torch.rand(1, 2_000, DK, generator=g), torch.rand(1, 2_000, DV, generator=g)
    att = SetLinearAttention(DQ, DK, DV, MODEL, heads=2)
    phi = FEATURE_MAPS[att.feature_map]
    qmask = torch.ones(1, 16, dtype=torch.bool)
    results = {}
    for copies in (1, 10):  # the same key set, each key repeated `copies` times: 2,000 vs 20,000 keys
        key, value = base_key.repeat(1, copies, 1), base_value.repeat(1, copies, 1)
        kmask = torch.ones(1, key.size(1), dtype=torch.bool)
        with torch.no_grad():
            q, k, v = att.project(query, key, value)
            unnormalised = phi(q) @ (phi(k).transpose(-1, -2) @ v)  # phi(Q) (phi(K)^T V), no D^-1
            results[copies] = (att.mix(query, key, value, qmask, kmask), unnormalised, v.abs().amax(dim=2, keepdim=True))
    (norm1, raw1, bound), (norm10, raw10, _) = results[1], results[10]
    torch.testing.assert_close(norm10, norm1, rtol=1e-4, atol=1e-5)  # D^-1: repeating keys changes nothing
    torch.testing.assert_close(raw10, 10 * raw1, rtol=1e-4, atol=0.0)  # without it: proportional to N
    assert torch.all(norm10.abs() <= bound * (1 + 1e-5))
    assert raw10.abs().max() > 1e4 * bound.max()  # far outside the values' hull


@pytest.mark.parametrize("attention", list(AttentionKind))
def test_candidate_permutations(attention):
    query, key, value = _inputs(3)
    qmask = torch.ones(B, M, dtype=torch.bool)
    att = SetLinearAttention(DQ, DQ, DQ, MODEL, heads=2, attention=attention)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(0))
    # c2c: permuting the candidates (queries = keys = values) permutes the outputs the same way
    c2c = att(query, query, query, QUERY_MASK, QUERY_MASK)
    qp, mp = query[:, perm], QUERY_MASK[:, perm]
    torch.testing.assert_close(att(qp, qp, qp, mp, mp), c2c[:, perm], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(c2c[2], c2c[2, perm])  # a real permutation
    # c2s: permuting the keys (and their mask) leaves every candidate's output unchanged
    att = SetLinearAttention(DQ, DK, DV, MODEL, heads=2, attention=attention)
    c2s = att(query, key, value, qmask, KEY_MASK)
    kp = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(att(query, key[:, kp], value[:, kp], qmask, KEY_MASK[:, kp]), c2s, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", list(AttentionKind))
def test_masked_keys_have_no_influence_and_get_no_gradient(attention):
    query, key, value = _inputs(4)
    att = _module(2, attention=attention)
    out = att(query, key, value, QUERY_MASK, KEY_MASK)
    other_key, other_value = key.clone(), value.clone()
    other_key[~KEY_MASK] = torch.randn(int((~KEY_MASK).sum()), DK) * 1e3  # padding must only be finite
    other_value[~KEY_MASK] = torch.randn(int((~KEY_MASK).sum()), DV) * 1e3
    torch.testing.assert_close(att(query, other_key, other_value, QUERY_MASK, KEY_MASK), out, atol=0.0, rtol=0.0)
    other_query = query.clone()
    other_query[~QUERY_MASK] = 1e4
    torch.testing.assert_close(att(other_query, key, value, QUERY_MASK, KEY_MASK), out, atol=0.0, rtol=0.0)

    query, key, value = (t.clone().requires_grad_(True) for t in (query, key, value))
    out = att(query, key, value, QUERY_MASK, KEY_MASK)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    for t, mask in ((key, KEY_MASK), (value, KEY_MASK), (query, QUERY_MASK)):
        assert torch.all(t.grad[~mask] == 0)
    real_keys = KEY_MASK & QUERY_MASK.any(1, keepdim=True)
    assert torch.all(key.grad[real_keys].abs().sum(-1) > 0) and torch.all(value.grad[real_keys].abs().sum(-1) > 0)
    assert torch.all(query.grad[QUERY_MASK & KEY_MASK.any(1, keepdim=True)].abs().sum(-1) > 0)


@pytest.mark.parametrize("attention", list(AttentionKind))
@pytest.mark.parametrize("feature_map", list(FeatureMap))
def test_empty_key_sets_give_zeros_and_finite_gradients(attention, feature_map):
    query, key, value = (t.requires_grad_(True) for t in _inputs(6))
    att = _module(2, feature_map, attention)
    no_keys = torch.zeros(B, N, dtype=torch.bool)
    out = att(query, key, value, QUERY_MASK, no_keys)
    assert torch.all(out == 0)
    q, k, v = att.project(query, key, value)
    assert torch.all(att.mix(query, key, value, QUERY_MASK, no_keys) == 0)
    out = att(query, key, value, QUERY_MASK, KEY_MASK)  # request 1 has no key, the others do
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [query.grad, key.grad, value.grad] + [p.grad for p in att.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.all(query.grad[1] == 0) and query.grad[0].abs().sum() > 0


def test_softmax_mode_equals_scaled_dot_product_attention_with_the_same_projections():
    query, key, value = _inputs(7)
    heads = 2
    att = _module(heads, attention=AttentionKind.softmax)
    out = att.mix(query, key, value, QUERY_MASK, KEY_MASK)  # [B, H, M, d]
    q, k, v = att.project(query, key, value)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=KEY_MASK[:, None, None, :])
    explicit = torch.softmax(
        (q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)).masked_fill(~KEY_MASK[:, None, None, :], -math.inf), -1
    ) @ v  # [B, H, M, d]
    rows = (QUERY_MASK & KEY_MASK.any(1, keepdim=True))[:, None, :].expand(B, heads, M)  # [B, H, M]
    torch.testing.assert_close(out[rows], sdpa[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[rows], explicit[rows], atol=1e-6, rtol=1e-5)
    assert torch.all(out[~rows] == 0)
    full = att(query, key, value, QUERY_MASK, KEY_MASK)
    expected = att.w_o(sdpa.transpose(1, 2).reshape(B, M, MODEL))
    torch.testing.assert_close(full[rows[:, 0]], expected[rows[:, 0]], atol=1e-6, rtol=1e-5)
    # the same projections: a linear module with the same parameters differs only in the mixing
    lin = _module(heads, attention=AttentionKind.linear)
    lin.load_state_dict(att.state_dict())
    torch.testing.assert_close(lin.project(query, key, value)[0], q)
    assert not torch.allclose(lin.mix(query, key, value, QUERY_MASK, KEY_MASK), out)


@pytest.mark.parametrize("attention", list(AttentionKind))
def test_fx_traceable(attention):
    query, key, value = _inputs(8)
    att = _module(2, attention=attention)
    traced = torch.fx.symbolic_trace(att)
    torch.testing.assert_close(traced(query, key, value, QUERY_MASK, KEY_MASK), att(query, key, value, QUERY_MASK, KEY_MASK))
    m2, n2 = 9, 11  # shapes are not baked into the graph
    q2, k2, v2 = _inputs(9, m2, n2)
    qm, km = torch.ones(B, m2, dtype=torch.bool), torch.rand(B, n2) > 0.3
    torch.testing.assert_close(traced(q2, k2, v2, qm, km), att(q2, k2, v2, qm, km))


def test_invalid_heads():
    with pytest.raises(ValueError, match="divisible"):
        SetLinearAttention(DQ, DK, DV, 10, heads=3)


def test_elu1_is_elu_plus_one_in_value_and_gradient():
    from modules.linear_attention import FEATURE_MAPS_INPLACE

    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([0.0, -0.0, -1e-30, 1e-30, -100.0])])
    x.requires_grad_(True)
    y = FEATURE_MAPS[FeatureMap.elu1](x)
    x64 = x.detach().double()
    exact = torch.where(x64 > 0, x64 + 1.0, torch.exp(x64))  # elu(x) + 1 in float64
    # relative, even where elu + 1 cancels to 0 (the float32 rounding of x log2 e grows with |x|), down to 1e-13
    torch.testing.assert_close(y.double(), exact, atol=1e-37, rtol=4e-6)
    torch.testing.assert_close(y, torch.nn.functional.elu(x.detach()) + 1.0, atol=1e-7, rtol=0)
    assert torch.all(y > 0)
    (y * torch.arange(x.numel())).sum().backward()
    exact_grad = torch.where(x64 >= 0, 1.0, torch.exp(x64)) * torch.arange(x.numel())
    torch.testing.assert_close(x.grad.double(), exact_grad, atol=1e-33, rtol=4e-6)
    for kind in FeatureMap:  # the in-place maps give the same values
        z = x.detach().clone()
        torch.testing.assert_close(FEATURE_MAPS_INPLACE[kind](z.clone()), FEATURE_MAPS[kind](z), atol=0, rtol=0)


@pytest.mark.parametrize("attention", list(AttentionKind))
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("self_attention", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_folded_keys_factor_the_output_followed_by_a_linear_map(attention, heads, self_attention, grad):
    """With ``keys = fold_keys(...)`` and ``rows = query_rows(keys, W_q X_q)``, ``rows @ state + per_request``
    equals ``forward(...) @ weight.T`` on every real row, with and without autograd (the in-place path), for keys
    of their own and for self-attention."""
    query, key, value = _inputs(3)
    qmask = QUERY_MASK
    kmask = KEY_MASK
    if self_attention:
        key = value = query = torch.randn(B, M, DQ)
        kmask = qmask
        att = SetLinearAttention(DQ, DQ, DQ, MODEL, heads=heads, attention=attention)
    else:
        att = _module(heads, attention=attention)
    weight = torch.randn(11, MODEL)
    expected = att(query, key, value, qmask, kmask) @ weight.t()  # [B, M, 11]
    with torch.set_grad_enabled(grad):
        keys = att.fold_keys(weight, *((query, query) if self_attention else (key, value)), kmask)
        rows, state, per_request = att.query_rows(keys, att.w_q(query), qmask), keys.state, keys.per_request
        got = torch.bmm(rows, state) + per_request.unsqueeze(1)
    assert rows.shape == (B, M, MODEL) and state.shape == (B, MODEL, 11) and per_request.shape == (B, 11)
    real = qmask & kmask.any(1, keepdim=True)  # rows of requests without a key are 0 in forward
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    if not self_attention:  # request 1 has no valid key: no W_o bias either, and nothing from the state
        assert torch.all(per_request[1] == 0) and torch.all(got[1][qmask[1]] == 0)
    if grad:  # differentiable like forward
        got[real].sum().backward()
        assert att.w_q.weight.grad is not None and att.w_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kinds", [("linear", "linear"), ("linear", "softmax"), ("softmax", "softmax")])
@pytest.mark.parametrize("grad", [False, True])
def test_score_folded_is_the_mlp_over_the_concatenated_outputs_in_any_tiling(kinds, grad):
    """``score_folded`` over two attentions sharing the queries (one over keys of their own, one over the queries
    themselves) and a per-query block equals ``MLP([att_1, att_2, x]) `` on every real row, for steps of 1, 2 and
    all queries (several requests per step, padding, a request without keys); both linear takes the shared
    path (one feature map, one normalisation), a softmax one the per-attention path."""
    query, key, value = _inputs(5)
    torch.manual_seed(1)
    att1 = SetLinearAttention(DQ, DK, DV, MODEL, heads=2, attention=kinds[0])
    att2 = SetLinearAttention(DQ, DQ, DQ, MODEL, heads=2, attention=kinds[1])
    mlp = MLP(2 * MODEL + 4, [9, 5], out_features=1)
    extra = torch.randn(B, M, 4)
    qmask = QUERY_MASK
    out1 = att1(query, key, value, qmask, KEY_MASK)  # request 1 has no valid key: 0 rows
    out2 = att2(query, query, query, qmask, qmask)
    expected = mlp(torch.cat([out1, out2, extra], dim=-1)).squeeze(-1)  # [B, M]
    w1, w2, w_x = mlp.first_blocks([MODEL, MODEL, 4])
    with torch.set_grad_enabled(grad):
        k1, k2 = att1.fold_keys(w1, key, value, KEY_MASK), att2.fold_keys(w2, query, query, qmask)
        bias = (mlp.layers[0].bias + k1.per_request + k2.per_request)  # [B, F]
        for tile in (1, 2 * B, 100):  # one, two and all queries of every request per step
            got = score_folded([(att1, k1), (att2, k2)], query, qmask, [(extra, w_x)], bias, mlp, tile)
            assert got.shape == (B, M)
            torch.testing.assert_close(got[qmask], expected[qmask], atol=1e-5, rtol=1e-5)
        if grad:  # differentiable like the MLP over the concatenation
            got[qmask].sum().backward()
            assert att1.w_q.weight.grad.abs().sum() > 0 and att2.w_k.weight.grad.abs().sum() > 0


def test_query_rows_of_a_subset_are_those_rows_of_all():
    """A query's rows do not depend on the other queries of the step (what lets ``score_folded`` tile)."""
    query, key, value = _inputs(6)
    att = _module(2)
    with torch.no_grad():
        keys = att.fold_keys(torch.randn(7, MODEL), key, value, KEY_MASK)
        full = att.query_rows(keys, att.w_q(query), QUERY_MASK)
        part = att.query_rows(keys, att.w_q(query[:, 2:4]), QUERY_MASK[:, 2:4])
    torch.testing.assert_close(part, full[:, 2:4])

