"""Target attention: a target item (the query) attends over a user's behaviours (the keys).

Shapes: B batch, L behaviours (or K survivors of a search stage), D dim, H heads.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from modules.mlp import MLP, Activation


@torch.fx.wrap
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; rows without a valid position get all zeros.

    A leaf under ``torch.fx`` tracing. Masked positions get exactly zero weight and zero gradient.

    Args:
        scores: ``[..., L]``.
        mask: bool, broadcastable to ``scores``, True on valid positions.

    Returns:
        ``[..., L]`` weights summing to 1 on rows with a valid position, 0 elsewhere.
    """
    mask = mask.expand_as(scores)
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(~mask, 0.0)


def top_k_mask(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``mask [B, L]`` narrowed to the ``k`` highest ``scores [B, L]`` of each row among its True entries (ties
    at the k-th score stay in; a row with k or fewer True entries keeps them all). Not differentiable."""
    if k >= scores.size(1):
        return mask
    ranked = scores.detach().masked_fill(~mask, float("-inf"))  # [B, L]
    kth = ranked.topk(k, dim=1).values[:, -1:]  # [B, 1]
    return mask & (ranked >= kth)


torch.fx.wrap("top_k_mask")


class TargetAttention(nn.Module):
    """DIN's local activation unit (Zhou et al. 2018, Deep Interest Network, Eq. 3).

    ``v_U(A) = sum_j a(e_j, v_A) e_j``: the activation weight ``a`` of behaviour ``e_j`` for target ``v_A`` is
    an MLP over ``[v_A, e_j, v_A - e_j, v_A * e_j]``. As in the paper the weights are NOT softmax-normalised
    (so that the intensity of a user's interest is kept); ``softmax=True`` normalises them over the valid
    behaviours instead. Padding behaviours get weight 0 and no gradient.

    Args:
        dim: D, the width of the target and of every behaviour.
        hidden: hidden widths of the activation MLP (the paper uses ``[80, 40]``).
        activation: activation of the hidden layers.
        softmax: normalise the weights with a masked softmax.
        top_k: keep only the ``top_k`` highest-scoring behaviours of each row (0: all), before the softmax (the
            official DARE code's DIN line: a soft search by DIN's own scores).
        factorized: compute the activation unit's first layer without building ``[v_A, e_j, v_A - e_j,
            v_A * e_j]``: ``W [q, k, q - k, q * k] = (W_1 + W_3) q + (W_2 - W_3) k + W_4 (q * k)``, the ``q`` term
            once per target instead of once per behaviour. The same parameters and, up to float rounding, the
            same scores, at about half the first layer's cost and a quarter of its activation memory.
        device: where the parameters are created (``meta`` allowed).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: Activation = Activation.prelu,
        softmax: bool = False,
        factorized: bool = False,
        top_k: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: every behaviour), got {top_k}")
        self.top_k = top_k
        if factorized and not hidden:
            raise ValueError("factorized target attention needs at least one hidden layer")
        self.softmax = softmax
        self.factorized = factorized
        self.dim = dim
        self.unit = MLP(4 * dim, hidden, out_features=1, activation=activation, device=device)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Unmasked activation scores ``a(e_j, v_A)``: query ``[B, D]``, keys ``[B, L, D]`` -> ``[B, L]``."""
        if self.factorized:
            first = self.unit.layers[0]  # Linear(4D -> H)
            w_q, w_k, w_d, w_p = first.weight.split(self.dim, dim=1)  # each [H, D]
            at_query = torch.nn.functional.linear(query, w_q + w_d, first.bias)  # [B, H]
            at_keys = torch.nn.functional.linear(keys, w_k - w_d)  # [B, L, H]
            at_both = torch.nn.functional.linear(query.unsqueeze(1) * keys, w_p)  # [B, L, H]
            hidden = at_query.unsqueeze(1) + at_keys + at_both  # [B, L, H]
            for layer in list(self.unit.layers)[1:]:
                hidden = layer(hidden)
            return hidden.squeeze(-1)  # [B, L]
        q = query.unsqueeze(1).expand_as(keys)  # [B, L, D]
        features = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # [B, L, 4D]
        return self.unit(features).squeeze(-1)  # [B, L]

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the behaviours.

        Args:
            query: ``[B, D]`` target item embedding ``v_A``.
            keys: ``[B, L, D]`` behaviour embeddings ``e_j``.
            mask: ``[B, L]`` bool, True on real behaviours.

        Returns:
            ``[B, D]`` the user representation ``v_U(A)``.
        """
        scores = self.scores(query, keys)  # [B, L]
        if self.top_k > 0:
            mask = top_k_mask(scores, mask, self.top_k)  # [B, L]
        if self.softmax:
            weights = masked_softmax(scores, mask)  # [B, L]
        else:
            weights = scores.masked_fill(~mask, 0.0)  # [B, L]
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # [B, D]


class MultiHeadTargetAttention(nn.Module):
    """Multi-head scaled dot-product target attention (Vaswani et al. 2017, Eq. 1, with one query).

    Per head ``h``: ``softmax((q W_q^h)(K W_k^h)^T / sqrt(d) + beta_h) (V W_v^h)``, heads concatenated and
    optionally projected by ``W_o``. The optional additive bias ``beta`` is per behaviour (TWIN's
    ``(K_c W^c) beta`` cross-feature term, Chang et al. 2023, Eq. 7), shared by the heads (``[B, L]``) or per
    head (``[B, H, L]``). Padding behaviours (``mask`` False) get weight 0 and no gradient; a row without
    any valid behaviour returns ``W_o 0``.

    Args:
        query_dim: width of the target.
        key_dim: width of every behaviour key.
        num_heads: H.
        head_dim: d, the per-head width of queries, keys and values (default ``key_dim // num_heads``).
        value_dim: width of the values (default: ``key_dim``; values default to the keys).
        output_dim: width of the output projection ``W_o`` (None: no projection, output width ``H * d``).
        device: where the parameters are created (``meta`` allowed).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        num_heads: int = 1,
        head_dim: Optional[int] = None,
        value_dim: Optional[int] = None,
        output_dim: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if key_dim % num_heads:
                raise ValueError(f"key_dim {key_dim} is not divisible by num_heads {num_heads}; set head_dim")
            head_dim = key_dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        inner = num_heads * head_dim
        self.w_q = nn.Linear(query_dim, inner, bias=False, device=device)
        self.w_k = nn.Linear(key_dim, inner, bias=False, device=device)
        self.w_v = nn.Linear(value_dim if value_dim is not None else key_dim, inner, bias=False, device=device)
        self.w_o: nn.Module = nn.Linear(inner, output_dim, device=device) if output_dim is not None else nn.Identity()
        self.out_features = output_dim if output_dim is not None else inner

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        values: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attends from the target over the behaviours.

        Args:
            query: ``[B, D_q]`` target.
            keys: ``[B, L, D_k]`` behaviours.
            mask: ``[B, L]`` bool, True on real behaviours.
            values: ``[B, L, D_v]`` (default: ``keys``).
            bias: additive pre-softmax logits ``[B, L]`` (all heads) or ``[B, H, L]``.

        Returns:
            ``[B, D_out]``.
        """
        if values is None:
            values = keys
        batch, length = keys.size(0), keys.size(1)
        heads, d = self.num_heads, self.head_dim
        q = self.w_q(query).view(batch, heads, 1, d)  # [B, H, 1, d]
        k = self.w_k(keys).view(batch, length, heads, d).transpose(1, 2)  # [B, H, L, d]
        v = self.w_v(values).view(batch, length, heads, d).transpose(1, 2)  # [B, H, L, d]
        scores = torch.matmul(q, k.transpose(-1, -2)).squeeze(2) * self.scale  # [B, H, L]
        if bias is not None:
            scores = scores + bias.reshape(batch, -1, length)  # [B, H, L] ([B, L] broadcast over heads)
        weights = masked_softmax(scores, mask.unsqueeze(1))  # [B, H, L]
        out = torch.matmul(weights.unsqueeze(2), v).squeeze(2)  # [B, H, d]
        return self.w_o(out.reshape(batch, heads * d))  # [B, D_out]
