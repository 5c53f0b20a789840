"""Sharding: constraints, planning, DistributedModelParallel, and sharding plans as JSON / text.

The flow (driven by :mod:`launch.trainer`)::

    model on meta -> build_sharders() -> build_topology(...) -> plan(...) -> shard_model(...) -> DMP
                                                                   \\-> write_plan(run_dir, plan)

This module is the one import of the sharding layer (``from launch import sharding``); the code lives in

* :mod:`launch.sharders`: the model's tables (:func:`embedding_tables`), the sharders, :func:`shard_model`;
* :mod:`launch.planning`: the ``sharding`` config (:class:`ShardingConfig`), table keys
  (:func:`select_tables`: exact name, else the first matching glob), :func:`merge_constraints`,
  :func:`build_topology`, :func:`plan`;
* :mod:`launch.precision`: per-table precision (fp32 / fp16; int8 refused), :func:`apply_precisions`;
* :mod:`launch.plan_files`: ``plan.json`` (:func:`plan_to_json` / :func:`plan_from_json`), ``plan.txt``
  (:func:`plan_table`), :func:`write_plan`, :func:`check_plan` (a loaded plan against the model).

Imports run one way: ``sharders <- plan_files, precision <- planning <- sharding``.
"""

from launch.plan_files import plan_from_json, plan_table, plan_to_json, shard_metadata, write_plan
from launch.planning import (
    ShardingConfig,
    TableShardingConfig,
    build_topology,
    check_plan,
    merge_constraints,
    plan,
    select_tables,
)
from launch.sharders import (
    COMPUTE_KERNELS,
    SHARDING_TYPES,
    CpuEmbeddingBagCollectionSharder,
    TableMeta,
    ZooEmbeddingCollectionSharder,
    build_sharders,
    embedding_parameters,
    embedding_tables,
    shard_model,
    sharder_for,
)

__all__ = [
    "COMPUTE_KERNELS",
    "SHARDING_TYPES",
    "CpuEmbeddingBagCollectionSharder",
    "ShardingConfig",
    "TableMeta",
    "TableShardingConfig",
    "ZooEmbeddingCollectionSharder",
    "build_sharders",
    "build_topology",
    "check_plan",
    "embedding_parameters",
    "embedding_tables",
    "merge_constraints",
    "plan",
    "plan_from_json",
    "plan_table",
    "plan_to_json",
    "select_tables",
    "shard_metadata",
    "shard_model",
    "sharder_for",
    "write_plan",
]
