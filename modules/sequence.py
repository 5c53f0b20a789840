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
