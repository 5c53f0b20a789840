"""Two-stage search over long behaviour sequences: TWIN's CP-GSU and ESU (Chang et al. 2023, section 3.3).

Behaviour features are split into item-inherent features ``K_h`` (item id, category, ...: the same for every
user, so their projection can be computed once per item and cached) and user-item cross features ``K_c``
(time since the behaviour, behaviour type, ...). The target-behaviour relevance of TWIN Eq. 8 is, per head h,

    alpha_h = (K_h W_h^h)(q W_q^h)^T / sqrt(d_k) + (K_c W_c) beta_h

with ``W_c`` block-diagonal (each cross feature projected to one dimension) and ``beta`` learned. The
General Search Unit ranks all L behaviours of a row by exactly this relevance, with the ESU's parameters
(mean over heads), and keeps the top K; the Exact Search Unit attends over the K survivors with H heads,
``softmax(alpha_h)^T K W_v^h``, heads concatenated and projected by ``W_o`` (TWIN Eq. 9-10).

Histories stay jagged: values ``[S, ...]`` with S = sum of the row lengths, never a padded ``[B, L, D]``.

Shapes: B batch, S behaviours in the batch, U distinct items among them, K survivors, H heads, d_k head dim,
I_h inherent width, I_c cross width, C cross features, D_v value width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from modules.sequence import jagged_topk, select_jagged
from modules.target_attention import masked_softmax

torch.fx.wrap("masked_softmax")  # a leaf when called from this module too


@torch.fx.wrap
def _row_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    lengths = lengths.to(torch.long)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)


def row_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``[S]`` the row of every flat behaviour (``total`` = S = sum(lengths)). A leaf under fx tracing."""
    return _row_ids(lengths, total)


@torch.fx.wrap
def _unique_items(ids: torch.Tensor, sizes: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.dim() == 1:
        ids = ids.unsqueeze(1)
    s = ids.size(0)
    if s == 0:
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty
    if ids.size(1) == 1:
        _, inverse = torch.unique(ids[:, 0], return_inverse=True)  # [S]
    elif sizes is not None and math.prod(sizes) < 2**62:
        # One int64 key per behaviour (mixed radix over the id ranges): a 1-d unique, far cheaper than dim=0.
        key = ids[:, 0].to(torch.long)
        for j in range(1, ids.size(1)):
            key = key * sizes[j] + ids[:, j].to(torch.long)
        _, inverse = torch.unique(key, return_inverse=True)  # [S]
    else:
        _, inverse = torch.unique(ids, dim=0, return_inverse=True)  # [S] into U sorted distinct rows
    u = int(inverse.max()) + 1
    positions = torch.arange(s, device=ids.device)
    first = torch.full((u,), s, dtype=torch.long, device=ids.device).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )  # [U]
    return first, inverse


def unique_items(ids: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct items among S behaviours, by their inherent id columns.

    Args:
        ids: ``[S, F]`` integer ids of the item-inherent features (item id, category, ...), or ``[S]``.
        sizes: each column's id range (``ids[:, j] < sizes[j]``, e.g. the tables' rows): the columns are then
            folded into one int64 key (when the product of the sizes fits) instead of a row-wise unique.

    Returns:
        ``(first [U], inverse [S])``: ``first[u]`` is the flat index of distinct item ``u``'s first occurrence,
        ``inverse[s]`` the distinct item of behaviour ``s``, so that ``x[first][inverse]`` equals ``x`` for any
        per-behaviour function ``x`` of the inherent features alone. A leaf under fx tracing.
    """
    return _unique_items(ids, None if sizes is None else [int(n) for n in sizes])


@torch.fx.wrap
def _dot_rows(keys: torch.Tensor, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # A leaf under fx tracing. One request (serving): broadcast its query, no [N, H, d_k] gather.
    if query.size(0) == 1:
        # [N, H d_k] @ block-diagonal [H d_k, H]: one small GEMM instead of a broadcast multiply and a reduction.
        blocks = torch.block_diag(*[query[0, h].unsqueeze(1) for h in range(query.size(1))])  # [H d_k, H]
        return keys.reshape(keys.size(0), keys.size(1) * keys.size(2)) @ blocks  # [N, H]
    return (keys * query[rows]).sum(dim=-1)  # [N, H]


# Several requests on CPU: products and row sums over chunks of about this many floats (1 MiB; the same per-row
# bits as one product over all S, without an [S, W] temporary far larger than the cache).
_RANK_CHUNK_FLOATS = 1 << 18


@torch.fx.wrap
def _rank_dot(x: torch.Tensor, query: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # A leaf under fx tracing: ``[S]`` <x_s, query of s's row> for x ``[S, W]``, query ``[B, W]`` (no autograd).
    if query.size(0) == 1:  # one request (serving): one matrix-vector product (the bits of an [S, W] x [W, 1] GEMM)
        return x.mv(query[0])  # [S]
    b, s, w = query.size(0), x.size(0), x.size(1)
    chunk = max(1, _RANK_CHUNK_FLOATS // max(w, 1))  # behaviours per chunk
    chunked = x.device.type == "cpu" and s > 2 * chunk  # else one product over all S
    if s % b == 0 and bool((lengths == s // b).all()):  # equal rows: broadcast the B queries, no [S, W] gather
        n = s // b
        if not chunked:
            return (x.reshape(b, n, w) * query.unsqueeze(1)).sum(dim=-1).reshape(s)  # [B, L, W] -> [S]
        xs, out = x.reshape(b, n, w), x.new_empty(b, n)  # [B, L, W], [B, L]
        step = max(1, chunk // n)  # whole rows at a time, or one row in chunks
        for r in range(0, b, step):
            for i in range(0, n, chunk):
                part = (slice(r, r + step), slice(i, i + chunk))
                torch.sum(xs[part] * query[r:r + step].unsqueeze(1), dim=-1, out=out[part])
        return out.view(s)  # [S]
    rows = row_ids(lengths, s)  # [S]
    if not chunked:
        return (x * query[rows]).sum(dim=-1)  # [S]
    out = x.new_empty(s)
    for start in range(0, s, chunk):
        part = slice(start, start + chunk)
        torch.sum(x[part] * query[rows[part]], dim=-1, out=out[part])
    return out  # [S]


class TwinRelevance(nn.Module):
    """TWIN's target-behaviour relevance (Eq. 8), shared by the GSU and the ESU.

    Args:
        inherent_dim: I_h, width of a behaviour's item-inherent features ``K_h`` (concatenated).
        query_dim: width of the target ``q``.
        cross_dims: width of each user-item cross feature of ``K_c`` (its embedding, or 1 for a float);
            empty: no cross term.
        num_heads: H.
        head_dim: d_k.
        device: where the parameters are created (``meta`` allowed).
    """

    def __init__(
        self,
        inherent_dim: int,
        query_dim: int,
        cross_dims: Sequence[int] = (),
        num_heads: int = 4,
        head_dim: int = 16,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or head_dim <= 0:
            raise ValueError(f"num_heads and head_dim must be > 0, got {num_heads}, {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.w_h = nn.Linear(inherent_dim, num_heads * head_dim, bias=False, device=device)
        self.w_q = nn.Linear(query_dim, num_heads * head_dim, bias=False, device=device)
        self.cross_dims = [int(d) for d in cross_dims]
        if any(d <= 0 for d in self.cross_dims):
            raise ValueError(f"cross_dims must be positive, got {self.cross_dims}")
        # W_c block-diagonal: cross feature j's block is a vector of its width (its projection to 1-d).
        self.w_c = nn.Parameter(torch.empty(sum(self.cross_dims), device=device))  # [I_c]
        self.beta = nn.Parameter(torch.empty(len(self.cross_dims), num_heads, device=device))  # [C, H]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_h: torch's Linear default, W_q = W_h (when the widths allow); w_c uniform(+-1/sqrt(width)); beta = 0.

        The GSU ranks by this relevance from the first step, and the relevance learns only from the survivors
        (the ESU's gradient). Starting from a similarity of the item embeddings (``W_q = W_h``: the same item or
        category scores high) and without a cross-feature term (``beta = 0``: a random per-time-bucket bias would
        otherwise decide the first searches) the first survivors are the related behaviours, so the learning
        signal reaches them; both then train apart. Measured on synthetic_long (README, Two-stage entries).
        """
        if self.w_c.is_meta:
            return
        self.w_h.reset_parameters()
        self.w_q.reset_parameters()
        if self.w_q.weight.shape == self.w_h.weight.shape:
            with torch.no_grad():
                self.w_q.weight.copy_(self.w_h.weight)
        start = 0
        with torch.no_grad():
            for d in self.cross_dims:
                nn.init.uniform_(self.w_c[start:start + d], -1.0 / math.sqrt(d), 1.0 / math.sqrt(d))
                start += d
        nn.init.zeros_(self.beta)

    def keys(self, inherent: torch.Tensor) -> torch.Tensor:
        """``K_h W_h``: ``[N, I_h] -> [N, H, d_k]`` (the cacheable part: a function of the item alone)."""
        return self.w_h(inherent).view(-1, self.num_heads, self.head_dim)  # [N, H, d_k]

    def query(self, target: torch.Tensor) -> torch.Tensor:
        """``q W_q / sqrt(d_k)``: ``[B, D_q] -> [B, H, d_k]``."""
        return (self.w_q(target) * self.scale).view(-1, self.num_heads, self.head_dim)  # [B, H, d_k]

    def cross_bias(self, cross: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``(K_c W_c) beta``: ``[N, I_c] -> [N, H]`` (None without cross features)."""
        if cross is None or not self.cross_dims:
            return None
        weighted = cross * self.w_c  # [N, I_c]
        bounds = [sum(self.cross_dims[:j]) for j in range(len(self.cross_dims) + 1)]  # Python ints: traceable
        projected = torch.stack(
            [weighted[:, bounds[j]:bounds[j + 1]].sum(dim=-1) for j in range(len(self.cross_dims))], dim=-1
        )  # [N, C]: one scalar per cross feature
        return projected @ self.beta  # [N, H]

    def scores(
        self, keys: torch.Tensor, query: torch.Tensor, rows: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``alpha``: ``[N, H]`` for N behaviours with projected keys ``[N, H, d_k]`` of rows ``rows [N]``."""
        alpha = _dot_rows(keys, query, rows)  # [N, H]
        return alpha if bias is None else alpha + bias


@dataclass
class SearchResult:
    """The GSU's choice.

    Attributes:
        indices: ``[B, K]`` flat indices of the survivors into the S behaviours (``-1`` on padding slots).
        valid: ``[B, K]`` bool.
        scores: ``[S]`` the score every behaviour was ranked by (detached).
    """

    indices: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor


def hard_search(behaviours: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, k: int) -> SearchResult:
    """SIM-hard's GSU: per row, the ``k`` most recent behaviours whose value (e.g. category) equals the target's.

    Args:
        behaviours: ``[S]`` each behaviour's value.
        targets: ``[B]`` each row's target value.
        lengths: ``[B]``.
        k: K.

    Returns:
        the :class:`SearchResult` (scores ``[S]``: 1 on a match, else 0); rows with fewer matches have padding.
    """
    score = (behaviours == targets[row_ids(lengths, behaviours.size(0))]).float()  # [S]
    indices, valid = jagged_topk(score, lengths, k)  # matches first, most recent first
    picked = torch.cat([score.new_zeros(1), score])[indices + 1]  # [B, K] (index -1 -> 0)
    return SearchResult(indices=indices, valid=valid & (picked > 0), scores=score)


def log2_time_buckets(seconds: torch.Tensor, buckets: int) -> torch.Tensor:
    """``floor(log2(1 + seconds))`` clipped to ``[0, buckets - 1]`` (long, any shape): the time-since-behaviour
    cross feature as an id (negative times count as 0)."""
    return torch.log2(seconds.clamp(min=0.0) + 1.0).long().clamp(max=buckets - 1)


class GeneralSearchUnit(nn.Module):
    """TWIN's Consistency-Preserved GSU: the top K of every row by the ESU's own relevance (mean over heads).

    The ranking is not differentiable (TWIN trains the shared parameters through the ESU), so it runs without
    autograd. Its cost is the projection ``K_h W_h``; three ways to get it, the same scores up to rounding:

    * ``inherent`` per behaviour: project every behaviour (the naive path);
    * ``inherent`` with ``items = (first, inverse)`` from :func:`unique_items`: project each distinct item of
      the batch once and gather (training: a popular item recurs across and within histories);
    * ``cached_keys``: look the projection up in a cache built from a checkpoint (inference,
      ``launch/twin_cache.py``): a lookup and a dot product per behaviour;
    * ``fold=True`` with ``inherent``: fold ``W_h`` into the query, a dot product per behaviour of the inherent
      features already looked up (the ranking score is linear in ``K_h``): cheaper than any projection
      whenever the inherent features are at hand and ``I_h`` is not much wider than ``H * d_k``.

    Args:
        relevance: the ESU's :class:`TwinRelevance` (shared, not copied: consistency).
        top_k: K.
    """

    def __init__(self, relevance: TwinRelevance, top_k: int = 100) -> None:
        super().__init__()
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        self.relevance = relevance
        self.top_k = top_k

    def projected_keys(
        self,
        inherent: Optional[torch.Tensor] = None,
        items: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cached_keys: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[S, H, d_k]`` from one of the three sources (see the class docstring)."""
        r = self.relevance
        if cached_keys is not None:
            return cached_keys.view(-1, r.num_heads, r.head_dim)  # [S, H, d_k]
        if inherent is None:
            raise ValueError("GeneralSearchUnit needs inherent features or cached keys")
        if items is None:
            return r.keys(inherent)  # [S, H, d_k]
        first, inverse = items
        return r.keys(inherent[first])[inverse]  # [U, H, d_k] -> [S, H, d_k]

    def forward(
        self,
        query: torch.Tensor,
        lengths: torch.Tensor,
        cross: Optional[torch.Tensor] = None,
        inherent: Optional[torch.Tensor] = None,
        items: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cached_keys: Optional[torch.Tensor] = None,
        fold: bool = False,
    ) -> SearchResult:
        """Ranks every behaviour and keeps the K best per row.

        Args:
            query: ``[B, H, d_k]`` from ``relevance.query(target)``.
            lengths: ``[B]`` history lengths (S = their sum).
            cross: ``[S, I_c]`` cross features (None without).
            inherent: ``[S, I_h]`` inherent features (unless ``cached_keys``).
            items: ``(first [U], inverse [S])`` to project distinct items once.
            cached_keys: ``[S, H * d_k]`` looked-up cached projections.
            fold: fold ``W_h`` into the query instead (``u_b = mean_h W_h^h^T q_b W_q^h``, then ``K_h u``): the
                same ranking score, no behaviour projected at all (with ``inherent``; ignored with a cache).

        Returns:
            the :class:`SearchResult`; ties go to the more recent behaviour.
        """
        with torch.no_grad():
            r = self.relevance
            q = query.detach().reshape(query.size(0), r.num_heads * r.head_dim)  # [B, H d_k]
            if fold and cached_keys is None and inherent is not None:
                # mean_h (K_h W_h^h)(q W_q^h)^T = K_h u with u = mean_h W_h^h^T (q W_q^h): no behaviour is projected.
                u = q @ r.w_h.weight / r.num_heads  # [B, I_h]
                score = _rank_dot(inherent.detach(), u, lengths)  # [S]
            else:
                # The GSU ranks by the mean over heads, mean_h <k_h, q_h> = <k, q> / H over the H d_k-wide rows:
                # one dot product per behaviour (a matrix-vector product for one request), no [S, H] scores.
                keys = self.projected_keys(inherent, items, cached_keys)  # [S, H, d_k]
                flat_keys = keys.reshape(keys.size(0), r.num_heads * r.head_dim)  # [S, H d_k]
                score = _rank_dot(flat_keys, q, lengths) / r.num_heads  # [S]
            # The head mean of the cross bias with the ESU's own arithmetic: folding it into one vector v
            # (K_c v, v = w_c * mean_h beta) is the same number up to rounding, and rounding decides near-ties.
            bias = r.cross_bias(cross)  # [S, H] or None
            if bias is not None:
                score = score + bias.mean(dim=-1)
            indices, valid = jagged_topk(score, lengths, self.top_k)  # [B, K]
        return SearchResult(indices=indices, valid=valid, scores=score)


class ExactSearchUnit(nn.Module):
    """TWIN's ESU (Eq. 9-10): H-head target attention over the GSU's K survivors.

    ``Att_h = softmax(alpha_h)^T (K W_v^h)``, ``ESU = [Att_1, ..., Att_H] W_o``, with ``alpha_h`` from the shared
    :class:`TwinRelevance` recomputed on the survivors (with gradients: this is where the relevance learns).

    Args:
        relevance: the shared relevance.
        value_dim: D_v, width of a behaviour's values ``K`` (inherent and cross features concatenated).
        value_head_dim: per-head width of the values (default d_k).
        output_dim: width of ``W_o``'s output.
        device: where the parameters are created.
    """

    def __init__(
        self,
        relevance: TwinRelevance,
        value_dim: int,
        output_dim: int,
        value_head_dim: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.relevance = relevance
        h = relevance.num_heads
        self.value_head_dim = value_head_dim or relevance.head_dim
        self.w_v = nn.Linear(value_dim, h * self.value_head_dim, bias=False, device=device)
        self.w_o = nn.Linear(h * self.value_head_dim, output_dim, device=device)
        self.out_features = output_dim

    def forward(
        self,
        query: torch.Tensor,
        inherent: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        cross: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attends over the survivors.

        Args:
            query: ``[B, H, d_k]`` from ``relevance.query(target)``.
            inherent: ``[B, K, I_h]`` the survivors' inherent features.
            values: ``[B, K, D_v]`` the survivors' values.
            mask: ``[B, K]`` bool, True on real survivors.
            cross: ``[B, K, I_c]`` the survivors' cross features (None without).

        Returns:
            ``[B, output_dim]`` (``W_o 0`` for a row without survivors).
        """
        b, k = mask.size(0), mask.size(1)
        r = self.relevance
        keys = r.keys(inherent.reshape(b * k, -1))  # [B K, H, d_k]
        rows = torch.arange(b, device=mask.device).repeat_interleave(k)  # [B K]
        bias = r.cross_bias(cross.reshape(b * k, -1) if cross is not None else None)  # [B K, H]
        alpha = r.scores(keys, query, rows, bias).view(b, k, r.num_heads).transpose(1, 2)  # [B, H, K]
        weights = masked_softmax(alpha, mask.unsqueeze(1))  # [B, H, K]
        v = self.w_v(values).view(b, k, r.num_heads, self.value_head_dim).transpose(1, 2)  # [B, H, K, d_v]
        out = torch.matmul(weights.unsqueeze(2), v).squeeze(2)  # [B, H, d_v]
        return self.w_o(out.reshape(b, -1))  # [B, output_dim]


def gather_survivors(
    values: torch.Tensor, lengths: torch.Tensor, result: SearchResult
) -> tuple[torch.Tensor, torch.Tensor]:
    """The survivors' rows of jagged ``values [S, ...]``: ``([B, K, ...], mask [B, K])`` (zeros on padding)."""
    return select_jagged(values, lengths, result.indices, result.valid)


def search_quality(
    relevance: torch.Tensor, lengths: torch.Tensor, result: SearchResult, k: int
) -> dict[str, torch.Tensor]:
    """How well a GSU retrieved against known per-behaviour relevance (synthetic data's ground truth).

    Per row with more than ``k`` behaviours (shorter rows keep everything, a trivial search) and some positive
    relevance, else NaN:

    * ``gsu_ndcg@k``: DCG of the survivors in the GSU's order, gains = true relevance, over the ideal DCG of
      the row's ``k`` most relevant behaviours;
    * ``gsu_recall@k``: the share of the row's ``k`` most relevant behaviours (among those with relevance > 0)
      that survived.

    Args:
        relevance: ``[S]`` true relevance of every behaviour.
        lengths: ``[B]``.
        result: the GSU's choice (``[B, K']`` slots, any K').
        k: the cut-off.

    Returns:
        ``{"gsu_ndcg@k": [B], "gsu_recall@k": [B]}`` float, NaN where undefined.
    """
    relevance = relevance.detach().float()
    lengths = lengths.to(torch.long)
    s = relevance.numel()
    ideal_idx, ideal_valid = jagged_topk(relevance, lengths, k)  # [B, k]
    padded = torch.cat([relevance.new_zeros(1), relevance])  # [S + 1]: index -1 reads 0
    ideal = padded[ideal_idx + 1] * ideal_valid  # [B, k]
    relevant = ideal_valid & (ideal > 0)  # [B, k]
    discount = 1.0 / torch.log2(torch.arange(k, device=relevance.device, dtype=torch.float32) + 2.0)  # [k]
    got_idx, got_valid = result.indices[:, :k], result.valid[:, :k]  # [B, k]
    gains = padded[got_idx + 1] * got_valid  # [B, k]
    idcg = (ideal * discount).sum(1)  # [B]
    dcg = (gains * discount[: gains.size(1)]).sum(1)  # [B]
    chosen = torch.zeros(s + 1, dtype=torch.bool, device=relevance.device)
    chosen[(got_idx + 1)[got_valid]] = True
    hit = chosen[ideal_idx + 1] & relevant  # [B, k]
    defined = (lengths > k) & (idcg > 0)  # [B]
    nan = torch.full_like(idcg, float("nan"))
    ndcg = torch.where(defined, dcg / idcg.clamp(min=1e-30), nan)
    recall = torch.where(defined, hit.sum(1).float() / relevant.sum(1).clamp(min=1).float(), nan)
    return {f"gsu_ndcg@{k}": ndcg, f"gsu_recall@{k}": recall}
