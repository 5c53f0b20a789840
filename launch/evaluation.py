"""Evaluation: run a split through the sharded model, gather the entry's rows from every rank, call its metric set;
and the best-checkpoint rule.

Every rank yields the same number of evaluation batches (the reader pads with invalid rows:
:func:`datasets.reader.eval_batches`), so every rank runs the same number of forward passes (the sharded
model's all-to-alls need it); this module asserts it rather than padding again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from datasets.config import DataConfig
from datasets.reader import eval_batches, eval_loader
from datasets.schema import SchemaConfig
from launch.metrics import METRIC_SETS, MetricOptions, gather_rows
from models.base import TrainOutput


def task_names(metric_set: str, schema: SchemaConfig) -> list[str]:
    """The task names evaluation reports: the scalar labels, or the sequence labels (ranking without scalar
    labels, or a schema that has only sequence labels)."""
    if metric_set in ("ranking", "preranking") and not schema.labels:
        return [f.name for f in schema.sequence_labels]
    return list(schema.labels) or [f.name for f in schema.sequence_labels]


def spec_task_names(spec: Any, model_cfg: Any, schema: SchemaConfig) -> list[str]:
    """The task names of a zoo entry: its ``ModelSpec.tasks`` when it declares them, else :func:`task_names`."""
    if spec.tasks is not None:
        return list(spec.tasks(model_cfg, schema))
    return task_names(spec.metrics, schema)


def metric_names(metric_set: str, tasks: Sequence[str], options: MetricOptions) -> list[str]:
    """The numeric metrics ``metric_set`` computes for ``tasks`` (its keys on two made-up rows), sorted: what
    ``eval.best_metric`` may name."""
    t = len(tasks)
    labels = torch.tensor([[0.0] * t, [1.0] * t])  # [2, T] one negative and one positive row
    m = METRIC_SETS[metric_set](torch.zeros(2, t), labels, torch.zeros(2, dtype=torch.long), list(tasks),
                                options=options)
    return sorted(k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def split_config(data: DataConfig, paths: Sequence[str]) -> DataConfig:
    """The data config whose evaluation files are ``paths`` (the test split, say)."""
    return replace(data, eval_paths=list(paths))


def evaluate(
    dmp: nn.Module,
    data: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    caps: Mapping[str, int],
    metric_set: str,
    task_names: Sequence[str],
    options: MetricOptions,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One pass over ``data.eval_paths`` on every rank; returns the metrics (the same on every rank) and this
    rank's id fixes over the split (``[N_id]``).

    Raises:
        AssertionError: this rank yielded another number of batches than :func:`eval_batches` promises.
    """
    expected = eval_batches(data, world_size, caps)
    fixes = torch.zeros(len(data.schema.id_features), dtype=torch.long)
    rows: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "groups": [], "mask": [], "users": []}
    stats: dict[str, list[torch.Tensor]] = {}
    was_training = dmp.training
    dmp.eval()
    count = 0
    with torch.no_grad():
        for b in eval_loader(data, rank, world_size, sequence_caps=caps):
            count += 1
            fixes += b.id_fixes.cpu()
            _, out = dmp(b.to(device))
            assert isinstance(out, TrainOutput), f"the train module returned {type(out).__name__}, not TrainOutput"
            keep = out.mask.any(dim=1)  # [N] rows some task counts
            rows["logits"].append(out.logits[keep].float().cpu())
            rows["labels"].append(out.labels[keep].float().cpu())
            rows["groups"].append(out.groups[keep].long().cpu())
            rows["mask"].append(out.mask[keep].cpu())
            if out.users is not None:
                rows["users"].append(out.users[keep].long().cpu())
            for name, v in out.row_stats.items():
                stats.setdefault(name, []).append(v.detach().float().flatten().cpu())
    dmp.train(was_training)
    assert count == expected, f"rank {rank} yielded {count} evaluation batches, the reader promised {expected}"
    t = len(task_names)
    # Users are gathered when the train module gives them (the same module on every rank: all or none).
    has_users = bool(max_ranks(torch.tensor([1 if rows["users"] else 0]), device).item())
    if not has_users:
        del rows["users"]
    elif len(rows["users"]) != len(rows["groups"]):
        raise AssertionError(f"rank {rank}: the train module gave users for some evaluation batches only")
    empty = {"logits": (0, t), "labels": (0, t), "groups": (0,), "mask": (0, t), "users": (0,)}
    dtypes = {"logits": torch.float32, "labels": torch.float32, "groups": torch.long, "mask": torch.bool,
              "users": torch.long}
    full = {}
    for k, parts in rows.items():
        local = torch.cat(parts) if parts else torch.zeros(empty[k], dtype=dtypes[k])
        if k == "mask":  # gather as bytes (gloo has no bool all-gather)
            full[k] = gather_rows(local.to(torch.uint8).to(device)).cpu().bool()
        else:
            full[k] = gather_rows(local.to(device)).cpu()
    metrics = METRIC_SETS[metric_set](
        full["logits"], full["labels"], full["groups"], list(task_names), mask=full["mask"], options=options,
        users=full.get("users"),
    )
    means, notes = _row_stat_means(stats, device)
    metrics.update(means)
    metrics["notes"] = list(metrics.get("notes", [])) + notes
    return metrics, fixes


def _row_stat_means(
    stats: Mapping[str, list[torch.Tensor]], device: torch.device
) -> tuple[dict[str, Any], list[str]]:
    """``TrainOutput.row_stats`` over every rank: the mean of the defined (non-NaN) rows and their count.

    Every rank must report the same names (the same train module on the same kind of data); a name without
    any defined row is NaN with count 0.
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    for name in sorted(stats):
        v = torch.cat(stats[name])
        defined = ~torch.isnan(v)
        t = torch.tensor([float(v[defined].double().sum()), float(defined.sum())], dtype=torch.float64)
        total, count = sum_ranks(t, device).tolist()
        out[name] = total / count if count else float("nan")
        out[f"{name}/rows"] = int(count)
        if not count:
            notes.append(f"{name} is undefined: no evaluation row defines it (the model says when a row does)")
    return out, notes


@dataclass
class Best:
    """The best evaluation so far by one metric (``value`` None until the first evaluation)."""

    metric: str
    mode: str  # "max" or "min"
    value: Optional[float] = None
    step: Optional[int] = None

    def improves(self, metrics: Mapping[str, Any]) -> bool:
        """Whether ``metrics[metric]`` beats the best so far (an undefined value never does).

        Raises:
            KeyError: the metric set has no such metric (the message lists the ones it has).
        """
        if self.metric not in metrics:
            names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise KeyError(f"eval.best_metric {self.metric!r} is not computed by this entry; it has {names}")
        v = metrics[self.metric]
        if v is None or not math.isfinite(float(v)):
            return False
        if self.value is None:
            return True
        return v > self.value if self.mode == "max" else v < self.value

    def update(self, metrics: Mapping[str, Any], step: int) -> bool:
        if not self.improves(metrics):
            return False
        self.value, self.step = float(metrics[self.metric]), step
        return True

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}


def sum_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu()


def max_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()
