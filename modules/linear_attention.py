"""DUET's set-level attention: candidates attend over a behaviour sequence or over each other at linear cost.

Shapes: B batch (requests), M candidates (queries), N keys (behaviours, or the candidates themselves), D dim,
H heads, d = model_dim / H the per-head width.
"""

from __future__ import annotations

import enum
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn


class FeatureMap(str, enum.Enum):
    """The kernel feature map ``phi`` of linear attention (a YAML value: ``elu1`` or ``relu``)."""

    elu1 = "elu1"  # elu(x) + 1 > 0 (Katharopoulos et al. 2020): every degree is positive
    relu = "relu"  # relu(x) >= 0: a query can have degree 0; its attention output is then 0


class AttentionKind(str, enum.Enum):
    """How :class:`SetLinearAttention` mixes the projected values (a YAML value: ``linear`` or ``softmax``)."""

    linear = "linear"  # degree-normalised kernel attention, O((M + N) d^2)
    softmax = "softmax"  # ordinary scaled dot-product attention with the same projections, O(M N d)


_LOG2E = 1.4426950408889634


def _elu1(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` as ``relu(x) + 2^(min(x, 0) log2 e)``: the same function and gradient (1 for x >= 0, exp(x)
    below) up to float rounding. ``exp2`` runs vectorised on every CPU build; ``elu`` and ``exp`` go through
    a kernel that is 2-3x slower on some (measured here: 0.41 against 0.18 ms for 4,500 x 64)."""
    return torch.exp2(x.clamp(max=0.0) * _LOG2E) + torch.relu(x)


def _elu1_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_elu1` overwriting ``x`` and its own temporaries (inference on a fresh projection: no autograd)."""
    return x.clamp(max=0.0).mul_(_LOG2E).exp2_().add_(x.relu_())


FEATURE_MAPS: dict[FeatureMap, Callable[[torch.Tensor], torch.Tensor]] = {
    FeatureMap.elu1: _elu1,
    FeatureMap.relu: torch.relu,
}
# The same maps in place, for :meth:`SetLinearAttention.fold_keys` / ``query_rows`` without autograd (fewer fresh
# tensors: at 4,500 candidates the serving path is about 20% faster).
FEATURE_MAPS_INPLACE: dict[FeatureMap, Callable[[torch.Tensor], torch.Tensor]] = {
    FeatureMap.elu1: _elu1_,
    FeatureMap.relu: torch.relu_,
}


def _masked_features(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    feature_map: FeatureMap,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``phi(Q)``, ``phi(K)`` and ``V`` with padding rows set to exactly 0 (``[B, H, M|N, d]`` each)."""
    phi = FEATURE_MAPS[FeatureMap(feature_map)]
    qm = query_mask[:, None, :, None]  # [B, 1, M, 1]
    km = key_mask[:, None, :, None]  # [B, 1, N, 1]
    # torch.where, not a product: a padding row holding inf / NaN must not leak (0 * inf = NaN) and gets no gradient
    phi_q = torch.where(qm, phi(q), 0.0)  # [B, H, M, d]
    phi_k = torch.where(km, phi(k), 0.0)  # [B, H, N, d]
    v = torch.where(km, v, 0.0)  # [B, H, N, d_v]
    return phi_q, phi_k, v


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    feature_map: FeatureMap = FeatureMap.elu1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Degree-normalised linear attention, ``E = D^-1 phi(Q) (phi(K)^T V)``, in O((M + N) d d_v) per head.

    ``KV = phi(K)^T V`` (``[d, d_v]``) and ``z = phi(K)^T 1`` (``[d]``) are summed once over the valid keys;
    each query then costs ``phi(q) KV / (phi(q) z + eps)``. ``z`` is computed as the extra last column of
    ``phi(K)^T [V, 1]``, so numerator and degree come from one matmul. Padding keys contribute nothing and get
    no gradient; padding queries and queries without a valid key (``phi(q) z = 0``) return exactly 0.

    Args:
        q: ``[B, H, M, d]`` projected queries (before ``phi``).
        k: ``[B, H, N, d]`` projected keys (before ``phi``).
        v: ``[B, H, N, d_v]`` projected values.
        query_mask: ``[B, M]`` bool, True on real queries.
        key_mask: ``[B, N]`` bool, True on real keys.
        feature_map: ``phi``.
        eps: added to the degree ``phi(q) z``.

    Returns:
        ``[B, H, M, d_v]``.
    """
    phi_q, phi_k, v = _masked_features(q, k, v, query_mask, key_mask, feature_map)
    ones = key_mask[:, None, :, None].to(v.dtype).expand(-1, v.size(1), -1, -1)  # [B, H, N, 1]
    kv = torch.matmul(phi_k.transpose(-1, -2), torch.cat([v, ones], dim=-1))  # [B, H, d, d_v + 1]
    num_den = torch.matmul(phi_q, kv)  # [B, H, M, d_v + 1]
    num, den = num_den[..., :-1], num_den[..., -1:]  # [B, H, M, d_v], [B, H, M, 1]
    return num / (den + eps)  # [B, H, M, d_v]


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    feature_map: FeatureMap = FeatureMap.elu1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reference for :func:`linear_attention` through the explicit ``[M, N]`` matrix (O(M N d), tests only).

    ``A = phi(Q) phi(K)^T`` over valid query / key pairs, ``D = diag(A 1)``, ``E = (D + eps)^-1 A V``.
    Same arguments, same result up to float rounding.
    """
    phi_q, phi_k, v = _masked_features(q, k, v, query_mask, key_mask, feature_map)
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2))  # [B, H, M, N]
    degree = a.sum(dim=-1, keepdim=True)  # [B, H, M, 1]
    return torch.matmul(a / (degree + eps), v)  # [B, H, M, d_v]


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(Q K^T / sqrt(d)) V`` over the valid keys, O(M N d) per head.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels). Padding keys get weight 0 and no
    gradient; padding queries and queries without a valid key return exactly 0 (such rows attend to all keys,
    whose values are zeroed, instead of to none, which some kernels answer with NaN). Padding is removed by
    multiplying with the mask, so padding rows must be finite.

    Args:
        q: ``[B, H, M, d]``; k: ``[B, H, N, d]``; v: ``[B, H, N, d_v]``; masks as in :func:`linear_attention`.

    Returns:
        ``[B, H, M, d_v]``.
    """
    km = key_mask[:, None, :, None].to(v.dtype)  # [B, 1, N, 1]
    v = v * km  # [B, H, N, d_v]
    allowed = key_mask | ~key_mask.any(dim=1, keepdim=True)  # [B, N]
    out = torch.nn.functional.scaled_dot_product_attention(q, k * km, v, attn_mask=allowed[:, None, None, :])
    return out * query_mask[:, None, :, None].to(out.dtype)  # [B, H, M, d_v]


class FoldedKeys(NamedTuple):
    """The per-request side of a :class:`SetLinearAttention` followed by a linear map (:meth:`~SetLinearAttention.
    fold_keys`): what every query of the request reads."""

    state: torch.Tensor  # [B, H d, F]: rows @ state is the attention output times the map
    per_request: torch.Tensor  # [B, F]: W_o's bias through the map, 0 in a request without a valid key
    z: Optional[torch.Tensor]  # linear mode: [B, H, d], phi(K_h)^T 1
    k: Optional[torch.Tensor]  # softmax mode: [B, H, N, d] projected keys
    v: Optional[torch.Tensor]  # softmax mode: [B, H, N, d] projected values
    key_mask: torch.Tensor  # [B, N]


def degree_normalised(phi_q: torch.Tensor, z: torch.Tensor, eps: float, inplace: bool) -> torch.Tensor:
    """``phi(Q_h) / (phi(Q_h) z_h + eps)`` per head: ``phi_q`` ``[B, T, H, d]``, ``z`` ``[B, H, d]`` (an element-wise
    product and a row sum: 5x faster here than a batched matrix-vector product over the transposed heads)."""
    den = (phi_q * z.unsqueeze(1)).sum(dim=-1, keepdim=True).add_(eps)  # [B, T, H, 1]
    return phi_q.div_(den) if inplace else phi_q / den


class SetLinearAttention(nn.Module):
    """DUET's set-level interaction (Xiao et al. 2025, DUET: Dual Model Co-Training for Entire Space CTR
    Prediction, Sec. "set-level modelling"): linear attention with degree normalisation.

    ``E = D^-1 phi(Q) (phi(K)^T V)``, ``D = diag(phi(Q) phi(K)^T 1)`` with ``Q = X_q W_q``, ``K = X_k W_k``,
    ``V = X_v W_v`` per head, heads concatenated and projected by ``W_o``. DUET uses it twice:
    ``F_c-s = LinearAttn(F_can, F_seq, F_seq)`` (candidates over the behaviour sequence) and
    ``F_c-c = LinearAttn(F_can, F_can, F_can)`` (candidates over each other). Summing ``phi(K)^T V`` once makes
    the cost O((M + N) d^2) instead of O(M N d); the degree normalisation (as in a GCN) turns every output row
    into a convex combination of value rows, so it stays bounded however many keys there are.
    ``attention="softmax"`` keeps the same projections and uses ordinary scaled softmax attention instead (the
    quadratic baseline of ``benchmarks/duet_latency.py`` and an ablation).

    Without a permutation-dependent input the module is permutation-equivariant in the queries and invariant in
    the keys. Padding keys have no influence and get no gradient; padding query rows and requests without a
    valid key return 0. The forward has no data-dependent control flow (``torch.fx`` traceable). In linear mode
    it evaluates the folded form :meth:`folded_linear` (``W_v`` and ``W_o`` folded into the per-request state);
    :meth:`mix` is the per-head form before ``W_o`` and :func:`linear_attention_quadratic` the explicit one.

    Args:
        query_dim: D_q, the width of the queries (candidates).
        key_dim: D_k, the width of the keys.
        value_dim: D_v, the width of the values.
        model_dim: width of the projections and of the output; divisible by ``heads``.
        heads: H.
        feature_map: ``phi`` of linear attention (unused by ``softmax``).
        eps: added to the degree (linear attention).
        attention: ``linear`` or ``softmax``.
        device: where the parameters are created (``meta`` allowed).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int,
        model_dim: int,
        heads: int = 1,
        feature_map: FeatureMap = FeatureMap.elu1,
        eps: float = 1e-6,
        attention: AttentionKind = AttentionKind.linear,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if model_dim % heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = model_dim // heads
        self.model_dim = model_dim
        self.feature_map = FeatureMap(feature_map)
        self.eps = eps
        self.attention = AttentionKind(attention)
        self.w_q = nn.Linear(query_dim, model_dim, bias=False, device=device)
        self.w_k = nn.Linear(key_dim, model_dim, bias=False, device=device)
        self.w_v = nn.Linear(value_dim, model_dim, bias=False, device=device)
        self.w_o = nn.Linear(model_dim, model_dim, device=device)
        self.out_features = model_dim

    def project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head projections: ``[B, M, D_q]``, ``[B, N, D_k]``, ``[B, N, D_v]`` -> ``[B, H, M|N, d]`` each."""
        b, m, n = query.size(0), query.size(1), key.size(1)
        h, d = self.heads, self.head_dim
        q = self.w_q(query).view(b, m, h, d).transpose(1, 2)  # [B, H, M, d]
        k = self.w_k(key).view(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
        v = self.w_v(value).view(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
        return q, k, v

    def mix(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_mask: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The attention output per head, before ``W_o`` (arguments as in :meth:`forward`): ``[B, H, M, d]``."""
        q, k, v = self.project(query, key, value)
        if self.attention is AttentionKind.softmax:  # a module attribute, fixed at trace time
            return softmax_attention(q, k, v, query_mask, key_mask)
        return linear_attention(q, k, v, query_mask, key_mask, self.feature_map, self.eps)

    def folded_linear(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_mask: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``W_o`` of the linear attention heads with ``W_v`` and ``W_o`` folded into the per-request state.

        The same function as ``W_o(mix(...))`` (:func:`linear_attention`), reassociated so that only two
        products per query and two per key remain: with ``W_v^h`` ``[d, D_v]`` and ``W_o^h`` ``[model_dim, d]``
        the blocks of head ``h``,

        ``W_o(E) = sum_h (phi(Q_h) / (phi(Q_h) z_h + eps)) C_h + b_o``,
        ``C_h = (phi(K_h)^T X_v) (W_o^h W_v^h)^T`` (``[d, model_dim]``), ``z_h = phi(K_h)^T 1``.

        Per query: ``W_q`` and one ``[H d] x [model_dim]`` product (instead of ``phi(Q) KV`` then ``W_o``); per
        key: ``W_k`` and one ``[H d] x [D_v]`` product (instead of ``W_v`` then ``phi(K)^T V``). Padding rows are
        not zeroed here (:meth:`forward` does that). Padding is removed by multiplying with the mask (a
        vectorised product; ``torch.where`` is a scalar loop on CPU), so padding rows must be finite.

        Returns:
            ``[B, M, model_dim]``.
        """
        b, m = query.size(0), query.size(1)
        h, d = self.heads, self.head_dim
        phi = FEATURE_MAPS[self.feature_map]
        phi_k = phi(self.w_k(key)) * key_mask.unsqueeze(-1).to(key.dtype)  # [B, N, H d], 0 on padding keys
        kx = torch.bmm(phi_k.transpose(1, 2), value)  # [B, H d, D_v]: phi(K)^T X_v
        z = phi_k.sum(dim=1).view(b, 1, h, d)  # [B, 1, H, d]: phi(K)^T 1
        w_v = self.w_v.weight.view(h, d, -1)  # [H, d, D_v]
        w_o = self.w_o.weight.view(self.model_dim, h, d).permute(1, 2, 0)  # [H, d, model_dim]
        folded = torch.bmm(w_v.transpose(1, 2), w_o)  # [H, D_v, model_dim]: (W_o^h W_v^h)^T
        c = torch.matmul(kx.view(b, h, d, -1), folded).view(b, h * d, self.model_dim)  # [B, H d, model_dim]
        phi_q = phi(self.w_q(query)).view(b, m, h, d)  # [B, M, H, d]
        den = (phi_q * z).sum(dim=-1, keepdim=True)  # [B, M, H, 1]: phi(Q_h) z_h
        scaled = (phi_q * (den + self.eps).reciprocal()).view(b, m, h * d)  # [B, M, H d]
        return torch.bmm(scaled, c) + self.w_o.bias  # [B, M, model_dim] (baddbmm broadcasts the bias slowly)

    def fold_keys(
        self, weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
    ) -> FoldedKeys:
        """The key side of the attention followed by a linear map ``weight`` (``[F, model_dim]``, no bias),
        computed once per request, whatever the number of queries: with ``rows = query_rows(keys, W_q X_q)``,
        ``forward(...) @ weight.T == rows @ state + per_request[:, None, :]`` on every real query row. A layer that
        reads the output through ``weight`` (a column block of the first layer of DUET's MLP) thus costs one
        ``[H d] x [F]`` product per query, with neither the attention output nor ``W_o`` materialised
        (:func:`modules.folded_head.score_folded`).

        Linear mode: ``state = C_h weight^T`` per head (``C_h`` of :meth:`folded_linear`) and ``z_h = phi(K_h)^T 1``;
        softmax mode: the projected keys and values per head and ``state = (weight W_o)^T``. In both,
        ``per_request = has_key * (b_o weight^T)`` (``W_o``'s bias, 0 in a request without a valid key).
        """
        b, n = key.size(0), key.size(1)
        h, d = self.heads, self.head_dim
        has_key = key_mask.any(dim=1, keepdim=True).to(weight.dtype)  # [B, 1]
        per_request = has_key * torch.mv(weight, self.w_o.bias)  # [B, F]
        w_o = torch.mm(weight, self.w_o.weight)  # [F, model_dim]: weight W_o
        if self.attention is AttentionKind.softmax:  # a module attribute, fixed at trace time
            k = self.w_k(key).view(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
            v = self.w_v(value).view(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
            return FoldedKeys(w_o.t().expand(b, -1, -1), per_request, None, k, v, key_mask)
        # Without autograd every per-row step overwrites the fresh tensor before it (the same values).
        inplace = not torch.is_grad_enabled()
        phi = (FEATURE_MAPS_INPLACE if inplace else FEATURE_MAPS)[self.feature_map]
        phi_k = phi(self.w_k(key))  # [B, N, H d]
        key_ok = key_mask.unsqueeze(-1).to(key.dtype)  # [B, N, 1]
        phi_k = phi_k.mul_(key_ok) if inplace else phi_k * key_ok  # 0 on padding keys
        kx = torch.bmm(phi_k.transpose(1, 2), value)  # [B, H d, D_v]: phi(K)^T X_v
        z = phi_k.sum(dim=1).view(b, h, d)  # [B, H, d]: phi(K)^T 1
        w_v = self.w_v.weight.view(h, d, -1)  # [H, d, D_v]
        folded = torch.bmm(w_v.transpose(1, 2), w_o.view(-1, h, d).permute(1, 2, 0))  # [H, D_v, F]
        state = torch.matmul(kx.view(b, h, d, -1), folded).view(b, h * d, -1)  # [B, H d, F]
        return FoldedKeys(state, per_request, z, None, None, key_mask)

    def query_rows(self, keys: FoldedKeys, q: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """The per-query factor of :meth:`fold_keys`'s factorisation for projected queries ``q = W_q X_q``
        (``[B, T, H d]``, any subset of a request's queries: the rows of one query do not depend on the others).

        Linear mode: ``phi(Q_h) / (phi(Q_h) z_h + eps)`` per head (without autograd ``q`` may be overwritten);
        softmax mode: the per-head attention output over ``keys``. Rows of padding queries are unspecified.

        Returns:
            ``[B, T, H d]``; ``rows @ keys.state + keys.per_request`` is the attention output times ``weight^T``.
        """
        b, t = q.size(0), q.size(1)
        h, d = self.heads, self.head_dim
        if self.attention is AttentionKind.softmax:
            heads = softmax_attention(q.reshape(b, t, h, d).transpose(1, 2), keys.k, keys.v, query_mask, keys.key_mask)
            return heads.transpose(1, 2).reshape(b, t, h * d)  # [B, T, H d]
        inplace = not torch.is_grad_enabled()
        phi_q = (FEATURE_MAPS_INPLACE if inplace else FEATURE_MAPS)[self.feature_map](q)
        return degree_normalised(phi_q.reshape(b, t, h, d), keys.z, self.eps, inplace).view(b, t, h * d)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_mask: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attends from every query over the valid keys of its request.

        Args:
            query: ``[B, M, D_q]`` candidates (padded per request).
            key: ``[B, N, D_k]`` behaviours, or the candidates themselves.
            value: ``[B, N, D_v]``.
            query_mask: ``[B, M]`` bool, True on real candidates.
            key_mask: ``[B, N]`` bool, True on real keys.

        Returns:
            ``[B, M, model_dim]``, exactly 0 on padding query rows and in requests without a valid key.
        """
        b, m = query.size(0), query.size(1)
        if self.attention is AttentionKind.linear:  # a module attribute, fixed at trace time
            out = self.folded_linear(query, key, value, query_mask, key_mask)  # [B, M, model_dim]
        else:
            heads = self.mix(query, key, value, query_mask, key_mask)  # [B, H, M, d]
            out = self.w_o(heads.transpose(1, 2).reshape(b, m, self.model_dim))  # [B, M, model_dim]
        rows = query_mask & key_mask.any(dim=1, keepdim=True)  # [B, M]: a real candidate of a request with keys
        return out * rows.unsqueeze(-1).to(out.dtype)  # 0, not W_o's bias, on rows that attended to nothing
