"""The zoo registry: one frozen ModelSpec per entry, keyed by the entry's folder name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from datasets.schema import IdMapping, SchemaConfig


@dataclass(frozen=True)
class TableConstraint:
    """A model's default sharding preference for one table (config overrides it per table).

    Attributes:
        sharding_types: allowed torchrec sharding types, e.g. ``("table_wise", "row_wise")``; empty = any.
        compute_kernels: allowed compute kernels, e.g. ``("fused",)``; empty = any.
    """

    sharding_types: tuple[str, ...] = ()
    compute_kernels: tuple[str, ...] = ()


def large_table_constraint(schema: SchemaConfig, feature: str) -> TableConstraint:
    """The default of a large table (item ids, users): row-wise or table-wise, the planner picks; row-wise
    only for a ``mapping: mch`` feature's table (torchrec shards managed-collision collections row-wise only).

    Args:
        schema: the data schema.
        feature: an id feature of the table.
    """
    if schema.id_feature(feature).mapping is IdMapping.mch:
        return TableConstraint(sharding_types=("row_wise",))
    return TableConstraint(sharding_types=("row_wise", "table_wise"))


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry.

    Attributes:
        name: registry key, equal to the entry's folder under ``models/`` and to ``model.name`` in configs.
        config_cls: the entry's config dataclass (its YAML section ``model`` is validated against it).
        build: ``(config, schema, device) -> nn.Module`` whose ``forward(batch) -> logits [B, T]``.
            Called with ``torch.device("meta")`` by the trainer; embedding tables live in torchrec
            EmbeddingCollection / EmbeddingBagCollection modules so that they can be sharded.
        build_train_module: ``(model, config) -> nn.Module`` whose ``forward(batch)`` returns
            ``(loss, models.base.TrainOutput)``, the contract of TrainPipelineSparseDist.
        default_constraints: ``(config, schema) -> {table name: TableConstraint}``.
        sequence_caps: ``(config, schema) -> {sequence group: N}``: the model reads only the most recent N
            elements of that group's columns, so the reader drops the rest before they are embedded (and
            all-to-all'd). Empty (the default) = the model reads whole sequences.
        metrics: the metric set evaluation computes over the gathered ``TrainOutput`` rows, a key of
            ``launch.metrics.METRIC_SETS``: ``ctr`` (AUC, GAUC, logloss per task) or ``ranking`` (per-request
            AUC, Recall@K, NDCG@K with K from ``eval.ks``).
        select_metric: the metric that picks the best checkpoint by default (``eval.best_metric`` overrides).
        tasks: ``(config, schema) -> task names``: the columns of the train module's ``TrainOutput`` rows, when
            they are not one per label column (None: the schema's labels, or its sequence labels; see
            ``launch.evaluation.task_names``). E.g. the pre-rankers score the observed click twice, over the
            exposed candidates and over all of them.
    """

    name: str
    config_cls: type
    build: Callable[[Any, SchemaConfig, torch.device], nn.Module]
    build_train_module: Callable[[nn.Module, Any], nn.Module]
    default_constraints: Callable[[Any, SchemaConfig], Mapping[str, TableConstraint]]
    sequence_caps: Callable[[Any, SchemaConfig], Mapping[str, int]] = lambda config, schema: {}
    metrics: str = "ctr"
    select_metric: str = "auc"
    tasks: Optional[Callable[[Any, SchemaConfig], Sequence[str]]] = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"zoo entry {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    import models  # noqa: F401  (imports every entry explicitly)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the zoo has {sorted(_REGISTRY)}") from None


def all_specs() -> dict[str, ModelSpec]:
    import models  # noqa: F401

    return dict(_REGISTRY)
