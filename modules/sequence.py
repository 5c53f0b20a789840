"""Helpers for jagged behaviour sequences (oldest first, most recent last).

Shapes: B batch, L history length kept (``n``), D dim, S total number of behaviours in the batch.
"""

from __future__ import annotations

import torch


@torch.fx.wrap
def _last_n(values: torch.Tensor, lengths: torch.Tensor, n: int, right_aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # A leaf under fx tracing: `n` and `right_aligned` are Python constants, the rest is index arithmetic.
    lengths = lengths.to(torch.long)
    offsets = torch.cumsum(lengths, dim=0) - lengths  # [B] start of each row in `values`
    kept = torch.clamp(lengths, max=n)  # [B] behaviours kept per row
    first = offsets + lengths - kept  # [B] index (in `values`) of the oldest kept behaviour
    positions = torch.arange(n, device=lengths.device)  # [L]
    if right_aligned:
        shift = (n - kept).unsqueeze(1)  # [B, 1] leading padding slots
        mask = positions.unsqueeze(0) >= shift  # [B, L]
        index = first.unsqueeze(1) + positions.unsqueeze(0) - shift  # [B, L]
    else:
        mask = positions.unsqueeze(0) < kept.unsqueeze(1)  # [B, L]
        index = first.unsqueeze(1) + positions.unsqueeze(0)  # [B, L]
    # Row 0 of `padded_values` is a constant zero row that every padding slot reads: no gradient reaches
    # `values` from padding slots, and an empty batch (S = 0) still indexes safely.
    padded_values = torch.cat([values.new_zeros((1,) + values.shape[1:]), values], dim=0)  # [S + 1, ...]
    index = torch.where(mask, index + 1, torch.zeros_like(index))  # [B, L]
    return padded_values[index], mask  # [B, L, ...], [B, L]


def last_n(
    values: torch.Tensor, lengths: torch.Tensor, n: int, right_aligned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathers the most recent ``n`` behaviours of every jagged row into a padded tensor.

    Behaviours keep their chronological order (oldest first). With ``right_aligned=False`` row ``b`` holds
    its kept behaviours in slots ``[0, min(len_b, n))`` and padding after them; with ``right_aligned=True``
    the most recent behaviour is always in slot ``n - 1`` and padding comes first. Padding slots are zero.
    Vectorised and a leaf under ``torch.fx`` tracing.

    Args:
        values: ``[S, D]`` (or ``[S]``, or ``[S, ...]``) jagged values, rows concatenated, S = sum(lengths).
        lengths: ``[B]`` integer row lengths.
        n: number of slots L kept per row.
        right_aligned: put the most recent behaviour in the last slot.

    Returns:
        ``(padded [B, L, D], mask [B, L])``, ``mask`` True on real behaviours.
    """
    if n <= 0:
        raise ValueError(f"last_n needs n > 0, got {n}")
    return _last_n(values, lengths, n, right_aligned)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid positions of each row; zero for rows without any.

    Args:
        x: ``[B, L, D]``.
        mask: ``[B, L]`` bool, True on valid positions.

    Returns:
        ``[B, D]``.
    """
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)  # [B, D]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)  # [B, 1]
    return total / count


def jagged_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Start of every row in the flat values: ``[B]`` long, ``offsets[b] = sum(lengths[:b])``.

    Row ``b``'s behaviour at position ``p`` (0 = oldest) is flat index ``offsets[b] + p``.
    """
    lengths = lengths.to(torch.long)
    return torch.cumsum(lengths, dim=0) - lengths


@torch.fx.wrap
def _select_jagged(
    values: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # A leaf under fx tracing: index arithmetic and one gather.
    lengths = lengths.to(torch.long)
    offsets = jagged_offsets(lengths).unsqueeze(1)  # [B, 1]
    indices = indices.to(torch.long)
    mask = valid & (indices >= offsets) & (indices < offsets + lengths.unsqueeze(1))  # [B, K]
    if values.size(0) == 0:  # nothing to gather from: every slot is padding
        return values.new_zeros(indices.shape + values.shape[1:]), mask
    # Padding slots read row 0 and are zeroed (no copy of the S values: only the [B, K] slots are gathered).
    index = torch.where(mask, indices, torch.zeros_like(indices))  # [B, K]
    picked = values[index]  # [B, K, ...]
    keep = mask.reshape(mask.shape + (1,) * (values.dim() - 1))
    return picked.masked_fill(~keep, 0), mask  # [B, K, ...], [B, K]


def select_jagged(
    values: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathers chosen behaviours of every jagged row into a padded tensor (e.g. the top-K of a search unit).

    ``indices`` are flat indices into ``values``, as :func:`jagged_topk` returns them (from row positions:
    ``jagged_offsets(lengths).unsqueeze(1) + positions``). A slot is kept when ``valid`` is True and its
    index lies inside its own row ``b``, ``[offsets[b], offsets[b] + lengths[b])``; other slots are zero
    and take no gradient. Vectorised and a leaf under ``torch.fx`` tracing.

    Args:
        values: ``[S, D]`` (or ``[S]``, or ``[S, ...]``) jagged values, rows concatenated, S = sum(lengths).
        lengths: ``[B]`` integer row lengths.
        indices: ``[B, K]`` integer flat indices into ``values`` (any value in invalid slots, e.g. -1).
        valid: ``[B, K]`` bool, the slots to fill.

    Returns:
        ``(selected [B, K, D], mask [B, K])``: ``selected[b, j] = values[indices[b, j]]`` where ``mask``.
    """
    return _select_jagged(values, lengths, indices, valid)


def _order_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score, position): float32 bits made monotonic, the position below them."""
    bits = (scores.detach().float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0 (equal scores)
    bits = torch.where(torch.isnan(scores), torch.full_like(bits, 0x7FC00000), bits)  # every NaN as +NaN
    monotonic = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    return (monotonic.to(torch.long) << 32) + positions.to(torch.long)


def _top_of_equal_rows(ranked: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` positions of the ``width`` best of every row of ``ranked [B, L]`` (float32, no padding),
    by (score, position) descending, NaN above every number: the order of :func:`_order_keys`.

    One float ``torch.topk`` of ``width + 1`` per row (NaN counted as +inf). Strictly decreasing values (no
    tie within the chosen or across the cut, the rule for continuous scores): its order is already exact.
    A tie within only: the chosen set is exact and only its ``width`` members are ordered exactly (by
    position, then stably by score; ``torch.sort`` puts NaN first). A tie across the cut: the int64 keys of
    every behaviour decide, as for rows of unequal lengths.
    """
    n = ranked.size(1)
    keyed = torch.nan_to_num(ranked, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))  # [B, L]
    values, chosen = torch.topk(keyed, min(width + 1, n), dim=1)  # [B, width (+ 1)], ties in any order
    falls = values[:, 1:] < values[:, :-1]  # [B, width (- 1)]: strictly below the previous
    if bool(falls.all()):
        return chosen[:, :width]
    if width == n or bool(falls[:, width - 1].all()):  # no tie across the cut: the set is exact, order it
        later_first = chosen[:, :width].sort(dim=1, descending=True).values  # [B, width] positions, later first
        order = torch.sort(ranked.gather(1, later_first), dim=1, descending=True, stable=True).indices
        return later_first.gather(1, order)  # [B, width]
    positions = torch.arange(n, device=ranked.device)  # [L]
    return torch.topk(_order_keys(ranked, positions), width, dim=1).indices  # [B, width]


@torch.fx.wrap
def _jagged_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A leaf under fx tracing. Exact algorithms with one result; no padded [B, L_max, D] anything.
    lengths = lengths.to(device=scores.device, dtype=torch.long)
    b, s = lengths.numel(), scores.numel()
    slots = torch.arange(k, device=scores.device)  # [K]
    valid = slots.unsqueeze(0) < lengths.unsqueeze(1)  # [B, K]
    if s == 0:
        return torch.full((b, k), -1, dtype=torch.long, device=scores.device), valid
    if b == 1 and scores.device.type != "meta":  # one request (serving): no offsets, no padding
        top = _top_of_equal_rows(scores.detach().float().reshape(1, s), min(k, s))  # [1, min(K, L)]
        if top.size(1) < k:
            top = torch.cat([top, top.new_full((1, k - top.size(1)), -1)], dim=1)
        return top, valid
    offsets = jagged_offsets(lengths)  # [B]
    longest = int(lengths.max()) if scores.device.type != "meta" else 0
    if scores.device.type != "meta" and b * longest == s:
        # Rows all L_max long (a batch of equal requests): a [B, L] view of the scores, no key per behaviour.
        top = _top_of_equal_rows(scores.detach().float().reshape(b, longest), min(k, longest))  # [B, min(K, L)]
        if top.size(1) < k:
            top = torch.cat([top, top.new_zeros(b, k - top.size(1))], dim=1)
        indices = torch.where(valid, offsets.unsqueeze(1) + top, torch.full_like(top, -1))  # [B, K]
        return indices, valid
    if scores.device.type != "meta" and b * longest <= 2 * s + 4096:
        # Rows of similar lengths: one [B, L_max] int64 key per behaviour, then a per-row top-k (O(S)). The key
        # orders by score, then by position (later first among equal scores); padding slots get the minimum.
        rows = torch.repeat_interleave(torch.arange(b, device=scores.device), lengths, output_size=s)  # [S]
        positions = torch.arange(s, device=scores.device) - offsets[rows]  # [S]
        keys = torch.full((b, longest), torch.iinfo(torch.long).min, dtype=torch.long, device=scores.device)
        keys[rows, positions] = _order_keys(scores, positions)
        top = torch.topk(keys, min(k, longest), dim=1).indices  # [B, min(K, L_max)] positions, best first
        if top.size(1) < k:
            top = torch.cat([top, top.new_zeros(b, k - top.size(1))], dim=1)
        indices = torch.where(valid, offsets.unsqueeze(1) + top, torch.full_like(top, -1))  # [B, K]
        return indices, valid
    # Very uneven rows: two stable sorts of the S scores (O(S log S), O(S) memory).
    # 1) All scores, best first; on equal scores the larger flat index (the later behaviour of a row) first:
    # sorting the reversed scores stably keeps later elements ahead among equals.
    by_score = (s - 1) - torch.sort(scores.detach().flip(0), descending=True, stable=True).indices  # [S]
    # 2) Stably by row: rows in order, and within a row the order of 1).
    rows = torch.repeat_interleave(torch.arange(b, device=scores.device), lengths, output_size=s)  # [S]
    order = by_score[torch.sort(rows[by_score], stable=True).indices]  # [S] flat indices, row-major
    pick = (offsets.unsqueeze(1) + slots.unsqueeze(0)).clamp(max=s - 1)  # [B, K] into `order`
    indices = torch.where(valid, order[pick], torch.full_like(pick, -1))  # [B, K]
    return indices, valid


def jagged_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scored behaviours of every jagged row (the retrieval step of a search unit).

    Slot ``j`` of row ``b`` holds the row's ``j``-th best behaviour: scores descending, and among equal
    scores the more recent behaviour (later position in the row; the most recent is last) first. A row
    with fewer than ``k`` behaviours fills its first ``len_b`` slots; the others are padding: ``valid``
    False and index ``-1``. NaN scores rank above every number (``torch.sort``'s order).

    Rows all of one length (one request: serving) take one float ``torch.topk`` of ``k + 1`` per row over a
    ``[B, L]`` view of the scores and order only the ``k`` chosen exactly (nothing more when the chosen scores
    strictly decrease; a tie across the cut falls back to the keys below). Other rows of similar lengths
    (``B * L_max <= 2 S + 4096``) take a per-row ``torch.topk`` over one int64 key per behaviour (score bits,
    then position), ``[B, L_max]`` integers: O(S) time. Very uneven rows take two stable sorts of the S scores
    instead (O(S log S) time, O(S) memory). All give the same indices; none builds a padded ``[B, L_max, D]``
    tensor, so rows of 10^5 behaviours cost O(S) memory. Indices only (no gradient flows through the
    selection); gather the chosen behaviours with :func:`select_jagged`. A leaf under ``torch.fx`` tracing.

    Args:
        scores: ``[S]`` one score per behaviour, rows concatenated, S = sum(lengths).
        lengths: ``[B]`` integer row lengths (0 allowed).
        k: K, slots per row (a Python int > 0).

    Returns:
        ``(indices [B, K] long, flat indices into scores or -1; valid [B, K] bool)``.
    """
    if k <= 0:
        raise ValueError(f"jagged_topk needs k > 0, got {k}")
    return _jagged_topk(scores, lengths, k)


@torch.fx.wrap
def _pad_jagged(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A leaf under fx tracing: the width is the batch's longest row (a Python int read here, not traced).
    lengths = lengths.to(torch.long)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, M]
    if values.size(0) == lengths.numel() * width:  # every row full (e.g. one request): no padding, a view
        return values.view((lengths.numel(), width) + tuple(values.shape[1:])), mask
    padded = values.new_zeros((lengths.numel(), width) + tuple(values.shape[1:]))  # [B, M, ...]
    padded[mask] = values
    return padded, mask


def pad_jagged(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads jagged rows (e.g. every request's candidates) to the batch's longest row, left-aligned.

    Row ``b``'s elements fill slots ``[0, lengths[b])`` in order, the rest is zero; ``padded[mask]`` gives
    ``values`` back in its order. The width M is at least 1 (an all-empty batch gives one padding slot).
    When every row is full (one request, or rows of equal length) ``padded`` is a view of ``values`` (no copy:
    do not write into it). A leaf under ``torch.fx`` tracing.

    Args:
        values: ``[N, D]`` (or ``[N]``, ``[N, ...]``) jagged values, rows concatenated, N = sum(lengths).
        lengths: ``[B]`` integer row lengths.

    Returns:
        ``(padded [B, M, D], mask [B, M])``, ``mask`` True on real elements.
    """
    return _pad_jagged(values, lengths)
