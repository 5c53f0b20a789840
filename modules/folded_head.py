"""DUET's set head served fast: the prediction MLP's first layer over attention outputs, with each attention
folded into its per-request state (:meth:`modules.linear_attention.SetLinearAttention.fold_keys`), the candidates
in steps.

Shapes: B requests, M queries (candidates), F the first layer's width, H heads, d the per-head width.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from modules.linear_attention import (
    FEATURE_MAPS,
    FEATURE_MAPS_INPLACE,
    AttentionKind,
    FoldedKeys,
    SetLinearAttention,
    degree_normalised,
)

SCORE_TILE = 2048  # at most this many query rows per step of :func:`score_folded` (steps of equal size)


def score_folded(
    parts: Sequence[tuple[SetLinearAttention, FoldedKeys]],
    query: torch.Tensor,
    query_mask: torch.Tensor,
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor,
    mlp: nn.Module,
    tile: int = SCORE_TILE,
) -> torch.Tensor:
    """Logits of a prediction MLP whose first layer reads the outputs of attentions over the same queries, each
    folded into its per-request state (:meth:`SetLinearAttention.fold_keys`), beside per-query input blocks:

    ``h = bias + sum_p rows_p @ state_p + sum_j x_j w_j^T``, then ``mlp.after_first(h)``.

    The query side runs in equal steps of at most ``tile`` query rows (all requests together), so that the
    per-step tensors stay in cache instead of streaming ``[M, F]`` tensors through memory several times (at
    m = 4,500, n = 200, 3 steps of 1,500 ran 5-10% faster here than one; 1,024 or 256 rows per step slower).
    One product projects the queries of every attention (their ``W_q`` stacked); when all are linear with the
    same feature map, head width and eps, one feature-map pass and one normalisation serve them all, and one
    product applies every state (stacked). A query's logit does not depend on the step it falls in.

    Args:
        parts: ``(attention, its folded keys)`` in the order of their blocks in the first layer.
        query: ``[B, M, D_q]`` queries (candidates), padded per request.
        query_mask: ``[B, M]`` bool, True on real queries.
        blocks: ``(x [B, M, w], weight [F, w])`` per-query inputs of the first layer and their column blocks.
        bias: ``[B, F]``: the first layer's per-request part (its bias, per-request blocks, the attentions'
            ``per_request``).
        mlp: has ``after_first`` (:class:`modules.mlp.MLP`).
        tile: query rows per step (at least one query of every request per step).

    Returns:
        ``[B, M]`` logits; padding rows are unspecified.
    """
    b, m = query.size(0), query.size(1)
    attentions = [a for a, _ in parts]
    w_q = torch.cat([a.w_q.weight for a in attentions]) if len(parts) > 1 else attentions[0].w_q.weight
    state = torch.cat([k.state for _, k in parts], dim=1) if len(parts) > 1 else parts[0][1].state  # [B, ΣH d, F]
    first = attentions[0]
    shared = all(
        a.attention is AttentionKind.linear and a.feature_map is first.feature_map
        and a.head_dim == first.head_dim and a.eps == first.eps for a in attentions
    )  # fmt: skip
    z = torch.cat([k.z for _, k in parts], dim=1) if shared else None  # [B, ΣH, d]
    inplace = not torch.is_grad_enabled()
    if b == 1:  # one request (serving): plain matrix products, which run faster here than their batched forms
        query, query_mask, state, bias = query[0], query_mask[0], state[0], bias[0]
        z = z[0] if z is not None else None
        blocks = [(x_j[0], w_j.t()) for x_j, w_j in blocks]
    else:
        bias = bias.unsqueeze(1)  # [B, 1, F]
        blocks = [(x_j, w_j.t().expand(b, -1, -1)) for x_j, w_j in blocks]
    steps = max(1, -(-m // max(1, tile // b)))  # equal steps of at most `tile` queries of every request
    xs, ms = torch.tensor_split(query, steps, dim=-2), torch.tensor_split(query_mask, steps, dim=-1)
    split_blocks = [(torch.tensor_split(x_j, steps, dim=-2), w_j) for x_j, w_j in blocks]
    outs = [
        _fold_step(parts, w_q, z, state, bias, xs[i], ms[i], [(x_j[i], w_j) for x_j, w_j in split_blocks], mlp, inplace)
        for i in range(steps)
    ]
    return (torch.cat(outs, dim=-1) if steps > 1 else outs[0]).view(b, m)


def _fold_step(
    parts: Sequence[tuple[SetLinearAttention, FoldedKeys]],
    w_q: torch.Tensor,
    z: Optional[torch.Tensor],
    state: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    query_mask: torch.Tensor,
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    mlp: nn.Module,
    inplace: bool,
) -> torch.Tensor:
    """One step of :func:`score_folded`: the logits of queries ``x`` (``[B, T, D_q]``, or ``[T, D_q]`` for one
    request, with ``state``, ``bias``, ``z`` and ``blocks`` shaped alike), ``[B, T]`` or ``[T]``."""
    q = nn.functional.linear(x, w_q)  # [B, T, ΣH d]
    if z is not None:  # every attention linear with one feature map, head width and eps
        first = parts[0][0]
        phi_q = (FEATURE_MAPS_INPLACE if inplace else FEATURE_MAPS)[first.feature_map](q)
        heads = phi_q.view(*q.shape[:-1], -1, first.head_dim)  # [B, T, ΣH, d]
        lead = heads.shape[:-2]
        one = x.dim() == 2  # one request: [T, ...] shapes, made [1, T, ...] for the normalisation
        rows = degree_normalised(heads.unsqueeze(0) if one else heads, z.unsqueeze(0) if one else z, first.eps, inplace)
        rows = rows.view(*lead, -1)  # [B, T, ΣH d]
    else:
        b = x.size(0) if x.dim() == 3 else 1
        qs = torch.split(q.view(b, -1, q.size(-1)), [a.model_dim for a, _ in parts], dim=-1)
        qm = query_mask.view(b, -1)
        rows = torch.cat([a.query_rows(k, qa, qm) for (a, k), qa in zip(parts, qs)], dim=-1).view(q.shape)
    if x.dim() == 2:
        h = torch.addmm(bias, rows, state)  # [T, F]
        for x_j, w_j in blocks:
            h = h.addmm_(x_j, w_j)
    else:
        h = torch.baddbmm(bias, rows, state)  # [B, T, F]
        for x_j, w_j in blocks:
            h = h.baddbmm_(x_j, w_j)
    return mlp.after_first(h).squeeze(-1)

