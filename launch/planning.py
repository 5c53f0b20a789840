"""Planning: the ``sharding`` config section, per-table constraints, the topology, and torchrec's planner.

Constraints come from two places and are merged per table by :func:`merge_constraints`: the zoo entry's
defaults (``ModelSpec.default_constraints``, :class:`models.registry.TableConstraint`, keyed by exact table
names) and the experiment's ``sharding`` section (:class:`ShardingConfig`), which wins. A key of
``sharding.tables`` selects tables by name (:func:`select_tables`)::

    sharding:
      tables:
        t_item_id: {sharding_types: [row_wise]}         # one table, by its full name
        t_item_id__attn: {sharding_types: [table_wise]}  # a table with a role: t_<table>__<role>
        "*__repr": {sharding_types: [column_wise]}      # a glob: every table of role repr
        "t_item_id__*": {compute_kernels: [fused]}      # a glob: every role of the item-id table

A table takes the entry of its exact name if there is one, else the first glob (in config order) that
matches its name, else none; one entry applies per table (entries are not merged with each other). Every key
must select at least one table: one that selects none fails before training and lists the model's tables.

An entry's ``precision`` (``fp32``, ``fp16``) sets the data type of the rows of the tables it selects:
:func:`plan` applies it to the model's table configs and weights (:func:`apply_precisions`) before planning,
so the planner sizes the shards for it and DMP allocates them in it; ``int8`` is refused (torchrec trains
fp32 / fp16 tables; int8 tables are inference-only, ``torchrec.quant``). ``sharding.candidates`` holds named
alternatives to ``sharding.tables`` for ``python -m launch.plan_compare`` (training ignores them).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingPlan
from torchrec.types import DataType

from launch.plan_files import PRECISION_BYTES, check_plan, plan_from_json, plan_precisions
from launch.precision import apply_precisions, data_types
from launch.sharders import COMPUTE_KERNELS, SHARDING_TYPES, TableMeta, check_names, embedding_tables, sharder_for

if TYPE_CHECKING:
    from models.registry import TableConstraint


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class TableShardingConfig:
    """Constraints on the tables one ``sharding.tables`` key selects; empty lists leave the choice open.

    Attributes:
        sharding_types: allowed torchrec sharding types (values of ``ShardingType``: ``table_wise``,
            ``row_wise``, ``column_wise``, ``table_row_wise``, ``data_parallel``, ...).
        compute_kernels: allowed compute kernels (values of ``EmbeddingComputeKernel``, e.g. ``fused``).
        min_partition: column-wise shard width: the planner splits ``dim`` into shards this wide
            (torchrec's ``ParameterConstraints.min_partition``; None = torchrec's default of 128 columns).
        cache_load_factor: with a UVM caching kernel (``fused_uvm_caching``, GPU clusters), the share of the
            table's rows the HBM cache holds (torchrec's ``CacheParams.load_factor``; None = torchrec's 0.2).
        pooling_factors: expected ids per row and feature of the table (the planner's cost model; None =
            torchrec's 1.0); long behaviour sequences look up hundreds per row.
        precision: data type of the table's rows, ``fp32`` or ``fp16`` (None = the table's own, fp32); fp16
            halves the weights (the planner's storage, the shards DMP allocates); fbgemm's kernels update the
            rows in fp16 with stochastic rounding and return fp32 embeddings. ``int8`` is refused (training
            does not support it).
    """

    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)
    min_partition: Optional[int] = None
    cache_load_factor: Optional[float] = None
    pooling_factors: list[float] = field(default_factory=list)
    precision: Optional[str] = None


@dataclass
class ShardingCandidate:
    """One named alternative of ``sharding.candidates`` (``python -m launch.plan_compare``).

    Attributes:
        tables: entries that replace the ``sharding.tables`` entries of the same key (whole entries, not
            field by field) and add the others; the base's other entries stay.
    """

    tables: dict[str, TableShardingConfig] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    """A cluster to plan for without running on it (``python -m launch.plan_cluster``); training plans for the
    ranks it runs on and ignores this section.

    Attributes:
        world_size: ranks (GPUs, or CPU processes) of the target job.
        local_world_size: ranks per host (nodes = world_size / local_world_size).
        device: ``cuda`` or ``cpu``: the compute device the planner costs kernels for.
        hbm_gib: accelerator memory per rank the planner may use, GiB (None = torchrec's default).
        ddr_gib: host memory per rank the planner may use, GiB (None = torchrec's default).
        intra_host_gbps: bandwidth between ranks of one host, GB/s with torchrec's GB of 2^30 bytes (None =
            torchrec's default; the same unit for the other bandwidths).
        inter_host_gbps: bandwidth between hosts, GB/s (None = torchrec's default).
        hbm_mem_gbps: HBM memory bandwidth, GB/s (None = torchrec's default).
        ddr_mem_gbps: host memory bandwidth, GB/s (None = torchrec's default).
    """

    world_size: int = 8
    local_world_size: int = 8
    device: str = "cuda"
    hbm_gib: Optional[float] = None
    ddr_gib: Optional[float] = None
    intra_host_gbps: Optional[float] = None
    inter_host_gbps: Optional[float] = None
    hbm_mem_gbps: Optional[float] = None
    ddr_mem_gbps: Optional[float] = None

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"sharding.cluster.device must be cpu or cuda, got {self.device!r}")
        if self.world_size <= 0 or self.local_world_size <= 0 or self.world_size % self.local_world_size:
            raise ValueError(
                f"sharding.cluster.world_size ({self.world_size}) must be a positive multiple of"
                f" local_world_size ({self.local_world_size})"
            )
        for name in ("hbm_gib", "ddr_gib", "intra_host_gbps", "inter_host_gbps", "hbm_mem_gbps", "ddr_mem_gbps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"sharding.cluster.{name} must be > 0 (or null for torchrec's default), got {v}")


@dataclass
class ShardingConfig:
    """The ``sharding`` section of an experiment.

    Attributes:
        tables: per-table constraints, keyed by a table name (``t_<table>``, ``t_<table>__<role>``) or a glob
            over names (``"*__attn"``; see :func:`select_tables` for which entry a table takes); they override
            the model's defaults field by field (an entry that only sets ``compute_kernels`` keeps the model's
            sharding types).
        default_sharding_types: sharding types for every table without a ``sharding_types`` entry in
            ``tables``; when non-empty they also override the model's defaults (empty = model defaults).
        plan_path: a ``plan.json`` written by :func:`launch.plan_files.write_plan`; when set it is loaded
            (checked against the model's tables, the world size and the constraints) instead of planning.
        batch_size: per-rank batch size the planner assumes when costing plans (None = torchrec's 512).
        hbm_cap: bytes of accelerator memory per rank the planner may use (None = torchrec's default;
            ignored on CPU, which has no HBM).
        ddr_cap: bytes of host memory per rank the planner may use (None = torchrec's default).
        cluster: the target cluster of ``python -m launch.plan_cluster`` (dry-run planning; training ignores it).
        candidates: named alternatives to ``tables`` that ``python -m launch.plan_compare`` plans side by side
            (:class:`ShardingCandidate`; training ignores them).
    """

    tables: dict[str, TableShardingConfig] = field(default_factory=dict)
    default_sharding_types: list[str] = field(default_factory=list)
    plan_path: Optional[str] = None
    batch_size: Optional[int] = None
    hbm_cap: Optional[int] = None
    ddr_cap: Optional[int] = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    candidates: dict[str, ShardingCandidate] = field(default_factory=dict)

    def validate(self) -> None:
        """Checks sharding type, kernel and precision names and numeric fields, of ``tables`` and of every
        candidate's (not table keys: see select_tables).

        Raises:
            ValueError: naming the bad entry and listing the valid values.
        """
        check_names("sharding.default_sharding_types", self.default_sharding_types, SHARDING_TYPES, "sharding type")
        _check_entries("sharding.tables", self.tables)
        for name, candidate in self.candidates.items():
            _check_entries(f"sharding.candidates.{name}.tables", candidate.tables)
        for name in ("batch_size", "hbm_cap", "ddr_cap"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"sharding.{name} must be > 0 (or null for torchrec's default), got {v}")
        self.cluster.validate()


def _check_entries(where: str, tables: Mapping[str, TableShardingConfig]) -> None:
    for key, t in tables.items():
        check_names(f"{where}.{key}.sharding_types", t.sharding_types, SHARDING_TYPES, "sharding type")
        check_names(f"{where}.{key}.compute_kernels", t.compute_kernels, COMPUTE_KERNELS, "compute kernel")
        if t.precision is not None:
            check_names(f"{where}.{key}.precision", [t.precision], tuple(PRECISION_BYTES), "precision")
        if t.min_partition is not None and t.min_partition <= 0:
            raise ValueError(f"{where}.{key}.min_partition must be > 0, got {t.min_partition}")
        if t.cache_load_factor is not None and not 0 < t.cache_load_factor <= 1:
            raise ValueError(f"{where}.{key}.cache_load_factor must be in (0, 1], got {t.cache_load_factor}")
        if any(p <= 0 for p in t.pooling_factors):
            raise ValueError(f"{where}.{key}.pooling_factors must be > 0, got {list(t.pooling_factors)}")


# ---------------------------------------------------------------------------------------------------- constraints


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def select_tables(keys: Iterable[str], tables: Iterable[str], where: str = "sharding.tables") -> dict[str, str]:
    """Which key selects each table: table name -> key, for the tables some key selects (in table order).

    A key is a table name (``t_<table>`` or ``t_<table>__<role>``, :func:`datasets.schema.table_name`) or a
    glob over names (``fnmatch`` syntax, case-sensitive: ``"*__attn"`` selects every table of role ``attn``).
    A table takes the key equal to its name if there is one, else the first glob in ``keys``' order that
    matches it.

    Args:
        keys: the config's keys, in config order.
        tables: the model's table names.
        where: the config section, for the error message.

    Raises:
        ValueError: a key selects no table (lists the keys and the model's tables).
    """
    keys, names = list(keys), list(tables)
    globs = [k for k in keys if _is_glob(k)]
    out: dict[str, str] = {}
    for name in names:
        if name in keys:
            out[name] = name
        else:
            key = next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)
            if key is not None:
                out[name] = key
    unmatched = [k for k in keys if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)]
    if unmatched:
        raise ValueError(
            f"{where} name tables the model does not have: {unmatched}; the model's tables: {names} (a key is a"
            " table name, t_<table> or t_<table>__<role>, or a glob over them such as '*__attn')"
        )
    return out


def merge_constraints(
    model_defaults: Mapping[str, "TableConstraint"],
    cfg: ShardingConfig,
    tables: Iterable[str],
) -> dict[str, ParameterConstraints]:
    """Planner constraints for every table that has any, config over model defaults.

    Per table and per field, the first non-empty of: the ``cfg.tables`` entry that selects the table
    (:func:`select_tables`: its exact name, else the first matching glob), ``cfg.default_sharding_types`` (for
    sharding types only), ``model_defaults[t]``. A table with nothing constrained gets no entry (planner free).

    Args:
        model_defaults: the zoo entry's ``default_constraints(config, schema)``, keyed by exact table names.
        cfg: the experiment's sharding section.
        tables: the model's table names (:func:`launch.sharders.embedding_tables`).

    Raises:
        ValueError: an unknown sharding type or compute kernel (lists the valid values), or a key or default
            constraint that selects no table of the model (lists the model's tables).
    """
    cfg.validate()
    names = list(tables)
    selected = select_tables(cfg.tables, names)
    unknown = sorted(set(model_defaults) - set(names))
    if unknown:
        raise ValueError(
            f"the model's default constraints name tables the model does not have: {unknown}; the model's"
            f" tables: {names}"
        )
    for table, c in model_defaults.items():
        check_names(f"default constraint of {table}", c.sharding_types, SHARDING_TYPES, "sharding type")
        check_names(f"default constraint of {table}", c.compute_kernels, COMPUTE_KERNELS, "compute kernel")
    table_precisions(cfg, names)  # refuses int8 before anything is planned

    out: dict[str, ParameterConstraints] = {}
    for table in names:
        entry = cfg.tables[selected[table]] if table in selected else None
        default = model_defaults.get(table)
        sharding_types = (
            list(entry.sharding_types) if entry is not None and entry.sharding_types
            else list(cfg.default_sharding_types) if cfg.default_sharding_types
            else list(default.sharding_types) if default is not None and default.sharding_types
            else []
        )
        compute_kernels = (
            list(entry.compute_kernels) if entry is not None and entry.compute_kernels
            else list(default.compute_kernels) if default is not None and default.compute_kernels
            else []
        )
        min_partition = entry.min_partition if entry is not None else None
        load_factor = entry.cache_load_factor if entry is not None else None
        pooling = list(entry.pooling_factors) if entry is not None and entry.pooling_factors else None
        if sharding_types or compute_kernels or min_partition is not None or load_factor is not None or pooling:
            kw: dict[str, Any] = {}
            if pooling:
                kw["pooling_factors"] = pooling
            out[table] = ParameterConstraints(
                sharding_types=sharding_types or None,
                compute_kernels=compute_kernels or None,
                min_partition=min_partition,
                cache_params=CacheParams(load_factor=load_factor) if load_factor is not None else None,
                **kw,
            )
    return out


def table_precisions(cfg: ShardingConfig, tables: Iterable[str]) -> dict[str, DataType]:
    """The data type ``sharding.tables`` sets for each table it gives a ``precision`` (table -> DataType).

    Raises:
        ValueError: a precision torchrec cannot train (``int8``), naming the key and its tables.
    """
    selected = select_tables(cfg.tables, list(tables))
    return data_types(selected, {k: e.precision for k, e in cfg.tables.items()})


def prepare_tables(
    model: nn.Module,
    cfg: ShardingConfig,
    model_defaults: Mapping[str, "TableConstraint"],
    sharders: list[ModuleSharder[nn.Module]],
    device_type: str,
) -> tuple[dict[str, TableMeta], dict[str, ParameterConstraints]]:
    """The tables and constraints to plan ``model`` with: constraints merged (:func:`merge_constraints`) and
    checked against the sharders, the tables' precisions applied (:func:`apply_precisions`).

    Raises:
        ValueError: as :func:`merge_constraints`, or a constraint the sharders cannot meet on ``device_type``.
    """
    tables = embedding_tables(model)
    constraints = merge_constraints(model_defaults, cfg, tables)
    _check_supported(constraints, tables, sharders, device_type)
    apply_precisions(model, table_precisions(cfg, tables))
    return embedding_tables(model), constraints


def _check_supported(
    constraints: Mapping[str, ParameterConstraints],
    tables: Mapping[str, TableMeta],
    sharders: list[ModuleSharder[nn.Module]],
    device_type: str,
) -> None:
    """Fails early, naming the table, when a constraint asks for what the table's sharder cannot do."""
    for table, c in constraints.items():
        meta = tables[table]
        sharder = sharder_for(meta.module_type, sharders)
        supported = list(sharder.sharding_types(device_type))
        bad = [t for t in (c.sharding_types or []) if t not in supported]
        if bad:
            raise ValueError(
                f"table {table} ({meta.module_type.__name__}): sharding types {bad} are not supported on"
                f" {device_type}; supported: {supported}"
            )
        if c.compute_kernels:
            kernels = {k for t in (c.sharding_types or supported) for k in sharder.compute_kernels(t, device_type)}
            bad = [k for k in c.compute_kernels if k not in kernels]
            if bad:
                raise ValueError(
                    f"table {table} ({meta.module_type.__name__}): compute kernels {bad} are not available on"
                    f" {device_type} for sharding types {c.sharding_types or supported}; available: {sorted(kernels)}"
                )


# ---------------------------------------------------------------------------------------------------- planning


def build_topology(
    world_size: int,
    local_world_size: int,
    device: torch.device,
    cfg: Optional[ShardingConfig] = None,
) -> Topology:
    """The planner's view of the job: ``world_size`` ranks of ``device.type``, ``local_world_size`` per host.

    Args:
        cfg: supplies ``hbm_cap`` / ``ddr_cap`` (None or a None field = torchrec's defaults).
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"can only plan for cpu or cuda devices, got {device}")
    if world_size <= 0 or local_world_size <= 0 or world_size % local_world_size:
        raise ValueError(
            f"world_size ({world_size}) must be a positive multiple of local_world_size ({local_world_size})"
        )
    # torchrec 1.8 warns that a Topology built directly, not by its factory, "will fail" in the future.
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=cfg.hbm_cap if cfg is not None else None,
            ddr_cap_bytes=cfg.ddr_cap if cfg is not None else None,
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )


def cluster_topology(cluster: ClusterConfig) -> Topology:
    """The planner's view of a target cluster (:class:`ClusterConfig`): ranks, hosts, memory and bandwidths."""
    cluster.validate()
    gib = 1024**3
    gbps = gib / 1e3  # GB/s -> bytes/ms, torchrec's unit (its constants count a GB as 2^30 bytes, e.g. 600 * 1024**3 / 1000)

    def scaled(v: Optional[float], unit: float) -> Optional[float]:
        return None if v is None else v * unit

    hardware = HardwareConfig(
        hbm_cap_bytes=None if cluster.hbm_gib is None else int(cluster.hbm_gib * gib),
        ddr_cap_bytes=None if cluster.ddr_gib is None else int(cluster.ddr_gib * gib),
        intra_host_bw=scaled(cluster.intra_host_gbps, gbps),
        inter_host_bw=scaled(cluster.inter_host_gbps, gbps),
        hbm_mem_bw=scaled(cluster.hbm_mem_gbps, gbps),
        ddr_mem_bw=scaled(cluster.ddr_mem_gbps, gbps),
    )
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=cluster.world_size, local_world_size=cluster.local_world_size),
        hardware_config=hardware,
        kernel_config=KernelConfig(compute_device=cluster.device),
    )


def plan(
    model: nn.Module,
    cfg: ShardingConfig,
    model_defaults: Mapping[str, "TableConstraint"],
    topology: Topology,
    sharders: list[ModuleSharder[nn.Module]],
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """The sharding plan of ``model``: loaded from ``cfg.plan_path`` or made by torchrec's planner.

    One planner plans every collection of the model together (several sub-models' tables included). With a
    process group (``pg``, or the default group when initialised) rank 0 plans / reads the file and
    broadcasts, so every rank gets the same plan; without one the plan is made locally. The tables'
    ``precision`` is applied to ``model`` first (in place, :func:`apply_precisions`); a loaded plan that
    states another precision for a table is refused.

    Args:
        model: the (meta-device) train module to shard.
        cfg: the sharding section.
        model_defaults: the zoo entry's default constraints.
        topology: from :func:`build_topology`.
        sharders: from :func:`launch.sharders.build_sharders`.
        pg: the process group; None = the default group if initialised.

    Raises:
        ValueError: bad constraints (see :func:`merge_constraints`), a constraint the sharders cannot meet,
            or a loaded plan that does not fit the model, the topology or the constraints.
    """
    tables, constraints = prepare_tables(model, cfg, model_defaults, sharders, topology.compute_device)
    if pg is None and dist.is_initialized():
        pg = dist.GroupMember.WORLD
    if cfg.plan_path is not None:
        loaded = _broadcast_json(pg, lambda: json.loads(Path(str(cfg.plan_path)).read_text()))
        result = plan_from_json(loaded)
        check_plan(result, tables, topology, constraints, source=str(cfg.plan_path),
                   precisions=plan_precisions(loaded))
        return result
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=cfg.batch_size, constraints=constraints)
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def _broadcast_json(pg: Optional[dist.ProcessGroup], read: Any) -> Any:
    """``read()`` on rank 0 of ``pg`` (or locally without one), broadcast to all ranks.

    Raises:
        ValueError: on every rank, when ``read()`` raised on rank 0.
    """
    box: list[Any] = [None]
    if pg is None or dist.get_rank(pg) == 0:
        try:
            box[0] = ("ok", read())
        except Exception as e:  # noqa: BLE001  (re-raised below on every rank)
            box[0] = ("error", f"{type(e).__name__}: {e}")
    if pg is not None:
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
    status, value = box[0]
    if status == "error":
        raise ValueError(f"cannot read the sharding plan (sharding.plan_path): {value}")
    return value
