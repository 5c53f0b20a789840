"""Evaluation metrics over the whole evaluation set: predictions are gathered from every rank, not averaged.

AUC comes from torchmetrics. GAUC is computed here, vectorised with numpy over the gathered predictions:
torchrec.metrics' GAUC is a streaming per-rank RecMetric with its own state and windowing, built to run inside
torchrec's metric module; over one gathered evaluation set a sort and a few bincounts are simpler. GAUC is the
impression-weighted mean of per-group (per-user) AUCs over the groups that have both a positive and a negative
(the groups with one class have no AUC and are left out, as in the DIN paper); logloss is the mean binary cross-entropy of the predicted probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.functional.classification import binary_auroc


def gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenates a tensor's rows across ranks (every rank gets the result); rows may differ per rank.

    Args:
        t: ``[n_r, ...]`` on this rank.

    Returns:
        ``[sum_r n_r, ...]`` in rank order.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    world = dist.get_world_size(group)
    n = torch.tensor([t.size(0)], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    max_n = int(max(int(s) for s in sizes))
    padded = torch.zeros((max_n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.size(0)] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores [N]`` against binary ``labels [N]``; NaN when one class is absent."""
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(scores.double(), labels.long()))


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Impression-weighted mean of per-group AUCs (ties get half credit), over groups with both classes.

    Args:
        scores: ``[N]`` predicted scores.
        labels: ``[N]`` 0/1.
        groups: ``[N]`` group ids (users).
    """
    s = scores.double().cpu().numpy()
    y = labels.cpu().numpy().astype(np.int64)
    g = groups.cpu().numpy()
    if s.size == 0:
        return float("nan")
    order = np.lexsort((s, g))  # by group, then score ascending
    s, y, g = s[order], y[order], g[order]
    # Average ranks within each (group, score) tie block, 1-based within the group.
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_block = new_group | np.r_[True, s[1:] != s[:-1]]
    idx = np.arange(s.size)
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    block_id = np.cumsum(new_block) - 1
    block_start = idx[new_block]
    block_end = np.r_[block_start[1:], s.size]  # exclusive
    avg_pos = (block_start + block_end - 1) / 2.0  # average 0-based position of the block
    ranks = avg_pos[block_id] - group_start + 1.0
    gid = np.cumsum(new_group) - 1
    n_groups = int(gid[-1]) + 1
    n = np.bincount(gid, minlength=n_groups).astype(np.float64)
    pos = np.bincount(gid, weights=y, minlength=n_groups)
    neg = n - pos
    rank_pos = np.bincount(gid, weights=ranks * y, minlength=n_groups)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    group_auc = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2.0) / (pos[ok] * neg[ok])
    return float(np.sum(group_auc * n[ok]) / np.sum(n[ok]))


def logloss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``[N]`` against 0/1 ``labels [N]``."""
    if labels.numel() == 0:
        return float("nan")
    p = probs.double().clamp(eps, 1 - eps)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def ctr_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, label_names: list[str]) -> dict[str, float]:
    """AUC, GAUC and logloss per task; the first task's also under the plain names ``auc``, ``gauc``, ``logloss``.

    Args:
        logits: ``[N, T]`` gathered over every rank.
        labels: ``[N, T]``.
        groups: ``[N]``.
        label_names: T task names.
    """
    out: dict[str, float] = {"eval_samples": int(labels.size(0))}
    for t, name in enumerate(label_names):
        probs = torch.sigmoid(logits[:, t].double())
        m = {"auc": auc(probs, labels[:, t]), "gauc": gauc(probs, labels[:, t], groups), "logloss": logloss(probs, labels[:, t])}
        for k, v in m.items():
            out[f"{k}/{name}"] = v
            if t == 0:
                out[k] = v
    return out
