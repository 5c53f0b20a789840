"""Evaluation metrics over the whole evaluation set: predictions are gathered from every rank, not averaged.

Three metric sets, each a :class:`MetricSet` (``METRIC_SETS`` names them), over flat rows ``[N]`` and tasks
``[T]``, with an optional validity mask ``[N, T]`` (the rows each task includes):

* ``ctr`` (:func:`ctr_metrics`, the default): per task AUC, GAUC and logloss; ``groups`` are users.
* ``ranking`` (:func:`ranking_metrics`, request-level data): per task the mean per-request AUC, Recall@K
  and NDCG@K over candidate lists of any lengths; ``groups`` are request ids (rows of one request need not
  be contiguous).
* ``preranking`` (:func:`preranking_metrics`, request-level pre-ranking over the entire candidate space, DUET):
  per task both of the above: AUC and logloss over all the task's rows, per-user AUC (``uauc``: GAUC with
  the rows' ``users`` as groups), and the per-request AUC, Recall@K and NDCG@K of ``ranking``.

A metric that is undefined on the data (AUC over labels of one class, no rows, no request with a positive)
is NaN (``None`` in metrics.json) and the set's ``notes`` (a list of strings) says why, e.g.
``"auc/click: all 9000 evaluation labels are 0; AUC is undefined"``.

AUC comes from torchmetrics. GAUC and the per-request metrics are computed here, vectorised with numpy over
the gathered predictions (one sort by (group, score), then bincounts; no loop over groups): torchrec.metrics'
GAUC is a streaming per-rank RecMetric with its own state and windowing, built to run inside torchrec's
metric module; over one gathered evaluation set a sort and a few bincounts are simpler. GAUC is the
impression-weighted mean of per-group (per-user) AUCs over the groups that have both a positive and a
negative (the groups with one class have no AUC and are left out, as in the DIN paper); logloss is the mean
binary cross-entropy of the predicted probabilities.

Ranking definitions (binary relevance, per request, scores descending; tied scores are averaged over their
orders, i.e. each position of a tie block of m rows with p positives counts p/m of a positive, the
expected value under a random order of the ties):

* request AUC: the unweighted mean of per-request AUCs (ties half credit) over the requests with both a
  positive and a negative; the others are skipped and counted.
* Recall@K: positives among the top K / positives of the request. A request with at most K candidates has
  all of them in its top K (Recall@K = 1); a request with more than K positives cannot reach 1.
* NDCG@K: DCG@K / IDCG@K with ``DCG@K = sum_{i<K} rel_i / log2(i + 2)`` (i the 0-based position) and the
  ideal DCG over the request's own positives, ``IDCG@K = sum_{i < min(K, P)} 1 / log2(i + 2)`` (P positives
  of the request): a request with fewer than K candidates is normalised by what its own list can reach.
* Recall@K and NDCG@K average (unweighted) over the requests with at least one positive; requests without
  a positive are skipped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.functional.classification import binary_auroc


@dataclass
class MetricOptions:
    """Options of the metric sets (each set reads the fields it needs).

    Attributes:
        ks: cut-offs K of Recall@K and NDCG@K (``ranking``), positive, distinct.
    """

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])

    def __post_init__(self) -> None:
        if not self.ks or any(int(k) != k or k <= 0 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"metric ks must be distinct positive integers, got {list(self.ks)}")


class MetricSet(Protocol):
    """What a model's evaluation computes, over predictions gathered from every rank.

    Args:
        logits: ``[N, T]``.
        labels: ``[N, T]`` 0/1 (any value where ``mask`` is False).
        groups: ``[N]`` integer ids: users for ``ctr`` (GAUC), requests for ``ranking``.
        mask: ``[N, T]`` bool, the rows each task includes; None = all.
        task_names: T names, used in the keys (``auc/<name>``).
        options: the set's options; None = defaults.
        users: ``[N]`` the user of each row, for sets that group by user besides ``groups`` (``preranking``);
            None = not given (the sets that need it fall back to ``groups``).

    Returns:
        Metric name -> value (float, NaN where undefined; int counts), and ``notes``: a list of strings
        saying why a metric is undefined (empty when every metric is defined).
    """

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        task_names: Sequence[str],
        mask: Optional[torch.Tensor] = None,
        options: Optional[MetricOptions] = None,
        users: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]: ...


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


def _group_aucs(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """AUCs (ties half credit) of the groups with both classes, their row counts, and the number of groups.

    Args:
        s: ``[N]`` float64 scores, N > 0.
        y: ``[N]`` int64 0/1.
        g: ``[N]`` group ids.
    """
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
    group_auc = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2.0) / (pos[ok] * neg[ok])
    return group_auc, n[ok], n_groups


def _numpy(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[np.ndarray, ...]:
    return (
        scores.double().cpu().numpy(),
        labels.cpu().numpy().astype(np.int64),
        groups.cpu().numpy(),
    )


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Impression-weighted mean of per-group AUCs (ties get half credit), over groups with both classes.

    Args:
        scores: ``[N]`` predicted scores.
        labels: ``[N]`` 0/1.
        groups: ``[N]`` group ids (users).
    """
    s, y, g = _numpy(scores, labels, groups)
    if s.size == 0:
        return float("nan")
    group_auc, n, _ = _group_aucs(s, y, g)
    if group_auc.size == 0:
        return float("nan")
    return float(np.sum(group_auc * n) / np.sum(n))


def logloss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``[N]`` against 0/1 ``labels [N]``."""
    if labels.numel() == 0:
        return float("nan")
    p = probs.double().clamp(eps, 1 - eps)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


@dataclass(frozen=True)
class RequestAUC:
    """Mean per-request AUC.

    Attributes:
        value: unweighted mean over the requests with both classes; NaN when there is none.
        requests: requests in the input.
        skipped: requests with one class only (no AUC), left out of ``value``.
    """

    value: float
    requests: int
    skipped: int


def request_auc(scores: torch.Tensor, labels: torch.Tensor, request_ids: torch.Tensor) -> RequestAUC:
    """The unweighted mean of per-request AUCs (ties half credit) over requests with both classes.

    Args:
        scores: ``[N]`` predicted scores.
        labels: ``[N]`` 0/1.
        request_ids: ``[N]`` the request of each row (rows of a request need not be contiguous).
    """
    s, y, g = _numpy(scores, labels, request_ids)
    if s.size == 0:
        return RequestAUC(float("nan"), 0, 0)
    group_auc, _, n_requests = _group_aucs(s, y, g)
    value = float(np.mean(group_auc)) if group_auc.size else float("nan")
    return RequestAUC(value, n_requests, n_requests - int(group_auc.size))


@dataclass(frozen=True)
class RankingAtK:
    """Recall@K and NDCG@K of candidate lists.

    Attributes:
        recall: K -> mean Recall@K over the requests with a positive (NaN when there is none).
        ndcg: K -> mean NDCG@K over the same requests.
        requests: requests in the input.
        skipped: requests without a positive, left out of the means.
    """

    recall: dict[int, float]
    ndcg: dict[int, float]
    requests: int
    skipped: int


def recall_ndcg_at_k(
    scores: torch.Tensor, labels: torch.Tensor, request_ids: torch.Tensor, ks: Sequence[int]
) -> RankingAtK:
    """Recall@K and NDCG@K per request (binary relevance, ties averaged), averaged over requests.

    Definitions in the module docstring. One sort by (request, score descending), then bincounts.

    Args:
        scores: ``[N]`` predicted scores.
        labels: ``[N]`` 0/1.
        request_ids: ``[N]`` the request of each row (rows of a request need not be contiguous).
        ks: the cut-offs K.
    """
    s, y, g = _numpy(scores, labels, request_ids)
    nan = {int(k): float("nan") for k in ks}
    if s.size == 0:
        return RankingAtK(dict(nan), dict(nan), 0, 0)
    order = np.lexsort((-s, g))  # by request, then score descending
    s, y, g = s[order], y[order], g[order]
    new_request = np.r_[True, g[1:] != g[:-1]]
    new_block = new_request | np.r_[True, s[1:] != s[:-1]]  # a block of tied scores within a request
    idx = np.arange(s.size)
    rank = idx - np.maximum.accumulate(np.where(new_request, idx, 0))  # 0-based position within the request
    block_id = np.cumsum(new_block) - 1
    # Expected relevance of each position under a random order of its tie block: the block's positive rate.
    rel = (np.bincount(block_id, weights=y) / np.bincount(block_id))[block_id]
    rid = np.cumsum(new_request) - 1
    n_requests = int(rid[-1]) + 1
    positives = np.bincount(rid, weights=y, minlength=n_requests)
    ok = positives > 0
    if not ok.any():
        return RankingAtK(dict(nan), dict(nan), n_requests, n_requests)
    discount = 1.0 / np.log2(rank + 2.0)
    recall: dict[int, float] = {}
    ndcg: dict[int, float] = {}
    for k in ks:
        top = rank < k
        hits = np.bincount(rid, weights=rel * top, minlength=n_requests)
        dcg = np.bincount(rid, weights=rel * discount * top, minlength=n_requests)
        ideal = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))]  # [k + 1]: IDCG of j positives
        idcg = ideal[np.minimum(positives[ok], k).astype(np.int64)]
        recall[int(k)] = float(np.mean(hits[ok] / positives[ok]))
        ndcg[int(k)] = float(np.mean(dcg[ok] / idcg))
    return RankingAtK(recall, ndcg, n_requests, n_requests - int(ok.sum()))


def _check_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    task_names: Sequence[str],
    mask: Optional[torch.Tensor],
) -> None:
    n, n_t = (labels.size(0) if labels.dim() == 2 else -1), len(task_names)
    given = {"logits": logits, "labels": labels, "groups": groups, **({} if mask is None else {"mask": mask})}
    wanted = {"logits": (n, n_t), "labels": (n, n_t), "groups": (n,), "mask": (n, n_t)}
    if any(tuple(v.shape) != wanted[k] for k, v in given.items()):
        got = ", ".join(f"{k} {list(v.shape)}" for k, v in given.items())
        raise ValueError(
            f"metrics need logits, labels, mask [N, T] and groups [N] with T = {n_t} ({list(task_names)}); got {got}"
        )


def _rows(mask: Optional[torch.Tensor], t: int, n: int) -> tuple[Any, str]:
    """Task ``t``'s row selection, and a phrase on the rows the mask leaves out (for notes)."""
    if mask is None:
        return slice(None), ""
    keep = mask[:, t].to(torch.bool)
    left_out = n - int(keep.sum())
    return keep, (f" (the mask leaves out {left_out} of {n} rows)" if left_out else "")


def _auc_note(key: str, labels: torch.Tensor, masked: str) -> Optional[str]:
    if labels.numel() == 0:
        return f"{key}: no evaluation rows{masked}; AUC is undefined"
    if labels.min() == labels.max():
        return f"{key}: all {labels.numel()} evaluation labels are {labels[0].item():g}{masked}; AUC is undefined"
    return None


def ctr_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    label_names: Sequence[str],
    mask: Optional[torch.Tensor] = None,
    options: Optional[MetricOptions] = None,
    users: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """The ``ctr`` set: AUC, GAUC and logloss per task; the first task's also under ``auc``, ``gauc``, ``logloss``.

    Keys: ``eval_samples`` (rows given; with a mask, rows that some task includes), per task ``auc/<name>``,
    ``gauc/<name>``, ``logloss/<name>``, ``eval_samples/<name>`` (rows the task includes), and ``notes``.

    Args:
        logits: ``[N, T]`` gathered over every rank.
        labels: ``[N, T]``.
        groups: ``[N]`` users (GAUC groups).
        label_names: T task names.
        mask: ``[N, T]`` bool, the rows each task includes; None = all.
        options: unused (the set has none); accepted to be a :class:`MetricSet`.
        users: unused (``groups`` are the users here); accepted to be a :class:`MetricSet`.
    """
    _check_inputs(logits, labels, groups, label_names, mask)
    n = int(labels.size(0))
    out: dict[str, Any] = {"eval_samples": n if mask is None else int(mask.to(torch.bool).any(dim=1).sum())}
    notes: list[str] = []
    for t, name in enumerate(label_names):
        rows, masked = _rows(mask, t, n)
        probs = torch.sigmoid(logits[rows, t].double())
        y, g = labels[rows, t], groups[rows]
        m = {"auc": auc(probs, y), "gauc": gauc(probs, y, g), "logloss": logloss(probs, y)}
        if y.numel() == 0:
            notes.append(f"auc/{name}, gauc/{name}, logloss/{name}: no evaluation rows{masked}; they are undefined")
        else:
            note = _auc_note(f"auc/{name}", y, masked)
            if note is not None:
                notes.append(note)
            if math.isnan(m["gauc"]):
                notes.append(
                    f"gauc/{name}: none of the {int(torch.unique(g).numel())} groups has both a positive and a"
                    f" negative{masked}; GAUC is undefined"
                )
        for k, v in m.items():
            out[f"{k}/{name}"] = v
            if t == 0:
                out[k] = v
        out[f"eval_samples/{name}"] = int(y.numel())
    out["notes"] = notes
    return out


def ranking_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    label_names: Sequence[str],
    mask: Optional[torch.Tensor] = None,
    options: Optional[MetricOptions] = None,
    users: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """The ``ranking`` set: per-request AUC, Recall@K and NDCG@K per task (definitions: module docstring).

    Keys, per task (the first task's also without ``/<name>``): ``request_auc/<name>``, ``recall@<K>/<name>``
    and ``ndcg@<K>/<name>`` for K in ``options.ks``, ``requests/<name>`` (requests with a row the task
    includes), ``requests_skipped_auc/<name>`` (one class only), ``requests_skipped_no_positive/<name>``
    (left out of Recall and NDCG); and ``eval_samples``, ``notes``. Scores are the logits (rank metrics do
    not change under the sigmoid, which would tie large logits).

    Args:
        logits: ``[N, T]`` one row per candidate, gathered over every rank.
        labels: ``[N, T]`` 0/1 relevance.
        groups: ``[N]`` request ids (rows of one request need not be contiguous).
        label_names: T task names.
        mask: ``[N, T]`` bool, the rows each task includes (e.g. real candidates); None = all.
        options: ``ks``, the cut-offs (default :class:`MetricOptions`).
        users: unused; accepted to be a :class:`MetricSet`.
    """
    _check_inputs(logits, labels, groups, label_names, mask)
    ks = (options or MetricOptions()).ks
    n = int(labels.size(0))
    out: dict[str, Any] = {"eval_samples": n if mask is None else int(mask.to(torch.bool).any(dim=1).sum())}
    notes: list[str] = []
    for t, name in enumerate(label_names):
        rows, masked = _rows(mask, t, n)
        s, y, r = logits[rows, t].double(), labels[rows, t], groups[rows]
        a = request_auc(s, y, r)
        rk = recall_ndcg_at_k(s, y, r, ks)
        m: dict[str, Any] = {"request_auc": a.value}
        for k in ks:
            m[f"recall@{k}"] = rk.recall[k]
            m[f"ndcg@{k}"] = rk.ndcg[k]
        m.update(requests=a.requests, requests_skipped_auc=a.skipped, requests_skipped_no_positive=rk.skipped)
        if a.requests == 0:
            notes.append(f"{name}: no evaluation rows{masked}; request AUC, Recall@K and NDCG@K are undefined")
        else:
            if math.isnan(a.value):
                notes.append(
                    f"request_auc/{name}: none of the {a.requests} requests has both a positive and a"
                    f" negative{masked}; per-request AUC is undefined"
                )
            if rk.skipped == rk.requests:
                notes.append(
                    f"recall@K/{name}, ndcg@K/{name}: none of the {rk.requests} requests has a positive{masked};"
                    " Recall@K and NDCG@K are undefined"
                )
        for k, v in m.items():
            out[f"{k}/{name}"] = v
            if t == 0:
                out[k] = v
    out["notes"] = notes
    return out


def preranking_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    label_names: Sequence[str],
    mask: Optional[torch.Tensor] = None,
    options: Optional[MetricOptions] = None,
    users: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """The ``preranking`` set (DUET / RecFlow): pointwise and per-request metrics of candidate rows per task.

    Per task (the first task's also without ``/<name>``): ``auc``, ``logloss`` and ``eval_samples`` over the
    task's rows, ``uauc`` (per-user AUC: impression-weighted mean of per-user AUCs, computed like ``gauc``
    with ``users`` as the groups), and ``request_auc``, ``recall@K``, ``ndcg@K``, ``requests`` and the
    skipped-request counts of the ``ranking`` set with ``groups`` as the requests. A train module chooses
    the tasks' rows by its mask: e.g. the observed click over the exposed candidates only, and the true
    click (known in synthetic data) over every candidate for the entire-space AUC.

    Args:
        logits: ``[N, T]`` one row per candidate, gathered over every rank.
        labels: ``[N, T]`` 0/1.
        groups: ``[N]`` request ids.
        label_names: T task names.
        mask: ``[N, T]`` bool, the rows each task includes; None = all.
        options: ``ks``, the cut-offs of Recall@K and NDCG@K.
        users: ``[N]`` user ids (None: per-user AUC groups by request instead, and a note says so).
    """
    _check_inputs(logits, labels, groups, label_names, mask)
    if users is not None and tuple(users.shape) != (labels.size(0),):
        raise ValueError(f"preranking metrics need users [N] = [{labels.size(0)}], got {list(users.shape)}")
    pointwise = ctr_metrics(logits, labels, groups if users is None else users, label_names, mask)
    ranked = ranking_metrics(logits, labels, groups, label_names, mask, options)
    out: dict[str, Any] = {"eval_samples": pointwise["eval_samples"]}
    for key, value in pointwise.items():
        if key not in ("notes", "eval_samples"):
            out[key.replace("gauc", "uauc", 1) if key.startswith("gauc") else key] = value
    for key, value in ranked.items():
        if key not in ("notes", "eval_samples"):
            out[key] = value
    notes = [n.replace("gauc/", "uauc/").replace("GAUC", "per-user AUC") for n in pointwise["notes"]]
    if users is None:
        notes.append("uauc: the train module gave no users; per-user AUC groups by request")
    out["notes"] = notes + list(ranked["notes"])
    return out


METRIC_SETS: Mapping[str, MetricSet] = {
    "ctr": ctr_metrics,
    "ranking": ranking_metrics,
    "preranking": preranking_metrics,
}
