"""Sharding: constraints, planning, DistributedModelParallel, and sharding plans as JSON / text.

The flow (driven by :mod:`launch.trainer`)::

    model on meta -> build_sharders() -> build_topology(...) -> plan(...) -> shard_model(...) -> DMP
                                                                   \\-> write_plan(run_dir, plan)

Constraints come from two places and are merged per table by :func:`merge_constraints`: the zoo entry's
defaults (``ModelSpec.default_constraints``, :class:`models.registry.TableConstraint`) and the experiment's
``sharding`` section (:class:`ShardingConfig`), which wins. Nothing here knows any zoo entry: tables are found
by walking the model for torchrec ``EmbeddingCollection`` / ``EmbeddingBagCollection`` modules.

A plan is written as ``plan.json`` (module path -> table -> sharding; see :func:`plan_to_json`) and
``plan.txt`` (:func:`plan_table`); ``sharding.plan_path=<run_dir>/plan.json`` reuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    CacheAlgorithm,
    MultiPassPrefetchConfig,
)
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.types import DataType

if TYPE_CHECKING:
    from models.registry import TableConstraint

SHARDING_TYPES: tuple[str, ...] = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS: tuple[str, ...] = tuple(k.value for k in EmbeddingComputeKernel)


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class TableShardingConfig:
    """Constraints on one table (``sharding.tables.<table>`` in YAML); empty lists leave the choice open.

    Attributes:
        sharding_types: allowed torchrec sharding types (values of ``ShardingType``: ``table_wise``,
            ``row_wise``, ``column_wise``, ``table_row_wise``, ``data_parallel``, ...).
        compute_kernels: allowed compute kernels (values of ``EmbeddingComputeKernel``, e.g. ``fused``).
        min_partition: column-wise shard width: the planner splits ``dim`` into shards this wide
            (torchrec's ``ParameterConstraints.min_partition``; None = torchrec's default of 128 columns).
    """

    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)
    min_partition: Optional[int] = None


@dataclass
class ShardingConfig:
    """The ``sharding`` section of an experiment.

    Attributes:
        tables: per-table constraints, keyed by table name (``t_<feature>``); they override the model's
            defaults field by field (an entry that only sets ``compute_kernels`` keeps the model's
            sharding types).
        default_sharding_types: sharding types for every table without a ``sharding_types`` entry in
            ``tables``; when non-empty they also override the model's defaults (empty = model defaults).
        plan_path: a ``plan.json`` written by :func:`write_plan`; when set it is loaded (checked against
            the model's tables, the world size and the constraints) instead of planning.
        batch_size: per-rank batch size the planner assumes when costing plans (None = torchrec's 512).
        hbm_cap: bytes of accelerator memory per rank the planner may use (None = torchrec's default;
            ignored on CPU, which has no HBM).
        ddr_cap: bytes of host memory per rank the planner may use (None = torchrec's default).
    """

    tables: dict[str, TableShardingConfig] = field(default_factory=dict)
    default_sharding_types: list[str] = field(default_factory=list)
    plan_path: Optional[str] = None
    batch_size: Optional[int] = None
    hbm_cap: Optional[int] = None
    ddr_cap: Optional[int] = None

    def validate(self) -> None:
        """Checks sharding type and kernel names and numeric fields (not table names: see merge_constraints).

        Raises:
            ValueError: naming the bad entry and listing the valid values.
        """
        _check_names("sharding.default_sharding_types", self.default_sharding_types, SHARDING_TYPES, "sharding type")
        for table, t in self.tables.items():
            _check_names(f"sharding.tables.{table}.sharding_types", t.sharding_types, SHARDING_TYPES, "sharding type")
            _check_names(
                f"sharding.tables.{table}.compute_kernels", t.compute_kernels, COMPUTE_KERNELS, "compute kernel"
            )
            if t.min_partition is not None and t.min_partition <= 0:
                raise ValueError(f"sharding.tables.{table}.min_partition must be > 0, got {t.min_partition}")
        for name in ("batch_size", "hbm_cap", "ddr_cap"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"sharding.{name} must be > 0 (or null for torchrec's default), got {v}")


def _check_names(where: str, names: Iterable[str], valid: tuple[str, ...], what: str) -> None:
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"{where}: unknown {what} {bad}; valid values: {list(valid)}")


# ---------------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableMeta:
    """One embedding table of a model, as the planner sees it.

    Attributes:
        module_path: the owning collection's path in the model (the plan's key), e.g. ``model.emb.ec``.
        module_type: ``EmbeddingCollection`` or ``EmbeddingBagCollection`` (picks the sharder).
        rows: ``num_embeddings``.
        dim: ``embedding_dim``.
        bytes_per_element: of the table's data type (4 for fp32).
    """

    module_path: str
    module_type: type
    rows: int
    dim: int
    bytes_per_element: int


def embedding_tables(model: nn.Module) -> dict[str, TableMeta]:
    """Every embedding table of ``model`` by table name, in module order.

    Works on an unsharded model (on any device, ``meta`` included) and on a DistributedModelParallel (its
    sharded collections; module paths then carry DMP's wrapper prefix).

    Raises:
        ValueError: two collections hold tables of the same name (planner constraints are keyed by table
            name, so names must be unique in a model).
    """
    out: dict[str, TableMeta] = {}
    for path, m in model.named_modules():
        configs: list[BaseEmbeddingConfig]
        if isinstance(m, EmbeddingCollection):
            configs, kind = list(m.embedding_configs()), EmbeddingCollection
        elif isinstance(m, EmbeddingBagCollection):
            configs, kind = list(m.embedding_bag_configs()), EmbeddingBagCollection
        elif isinstance(m, ShardedEmbeddingCollection):
            # torchrec keeps the unsharded configs only in this private attribute.
            configs, kind = list(m._table_name_to_config.values()), EmbeddingCollection
        elif isinstance(m, ShardedEmbeddingBagCollection):
            configs, kind = list(m._table_name_to_config.values()), EmbeddingBagCollection
        else:
            continue
        for c in configs:
            if c.name in out:
                raise ValueError(
                    f"table {c.name!r} appears in both {out[c.name].module_path!r} and {path!r}; table names must"
                    " be unique in a model"
                )
            out[c.name] = TableMeta(path, kind, c.num_embeddings, c.embedding_dim, DATA_TYPE_NUM_BITS[c.data_type] // 8)
    return out


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's EmbeddingCollection / EmbeddingBagCollection modules (the sharded ones)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)):
            params.extend(m.parameters())
    return params


# ---------------------------------------------------------------------------------------------------- sharders


class CpuEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """torchrec's EmbeddingBagCollection sharder, also admitting row-wise and table-row-wise on CPU.

    torchrec 1.8 offers ``row_wise`` / ``table_row_wise`` for bags only on CUDA, although the sharded module
    and fbgemm's CPU kernels run them on CPU + gloo (tests/dist checks row-wise parity). On CUDA this is
    torchrec's sharder unchanged.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
                if t not in types:
                    types.append(t)
        return types


class ZooEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """torchrec's EmbeddingCollection sharder without ``data_parallel``.

    In torchrec 1.8 a data-parallel EmbeddingCollection fails at its first forward when the input KJT carries
    features of other tables (``split_with_sizes expects split_sizes to sum exactly to ...``): its input
    distribution does not select the module's own features. Every zoo batch carries all id features in one
    KJT, so the planner must not pick data-parallel for an EmbeddingCollection (it would, for small tables).
    Asking for it in config fails with the list of supported types. EmbeddingBagCollections keep it.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]


def build_sharders(fused_params: Optional[dict[str, Any]] = None) -> list[ModuleSharder[nn.Module]]:
    """Sharders for EmbeddingCollection and EmbeddingBagCollection.

    EmbeddingCollection: table_wise, column_wise, row_wise (torchrec's sharder, which admits row-wise on CPU
    already, minus data_parallel: see :class:`ZooEmbeddingCollectionSharder`).
    EmbeddingBagCollection: those plus table_row_wise and table_column_wise, on CPU too.

    Args:
        fused_params: passed to fbgemm's TBE (e.g. ``{"optimizer": EmbOptimType.EXACT_SGD,
            "learning_rate": 0.1}``); None when the optimizer comes from ``apply_optimizer_in_backward``.
    """
    return [
        ZooEmbeddingCollectionSharder(fused_params=fused_params),
        CpuEmbeddingBagCollectionSharder(fused_params=fused_params),
    ]


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


# ---------------------------------------------------------------------------------------------------- constraints


def merge_constraints(
    model_defaults: Mapping[str, "TableConstraint"],
    cfg: ShardingConfig,
    tables: Iterable[str],
) -> dict[str, ParameterConstraints]:
    """Planner constraints for every table that has any, config over model defaults.

    Per table and per field, the first non-empty of: ``cfg.tables[t]``, ``cfg.default_sharding_types`` (for
    sharding types only), ``model_defaults[t]``. A table with nothing constrained gets no entry (planner free).

    Args:
        model_defaults: the zoo entry's ``default_constraints(config, schema)``.
        cfg: the experiment's sharding section.
        tables: the model's table names (:func:`embedding_tables`).

    Raises:
        ValueError: an unknown sharding type or compute kernel (lists the valid values), or a constraint on a
            table the model does not have (lists the model's tables).
    """
    cfg.validate()
    names = list(tables)
    known = set(names)
    for source, keys in (("sharding.tables", cfg.tables), ("the model's default constraints", model_defaults)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"{source} name tables the model does not have: {unknown}; the model's tables: {names}")
    for table, c in model_defaults.items():
        _check_names(f"default constraint of {table}", c.sharding_types, SHARDING_TYPES, "sharding type")
        _check_names(f"default constraint of {table}", c.compute_kernels, COMPUTE_KERNELS, "compute kernel")

    out: dict[str, ParameterConstraints] = {}
    for table in names:
        entry = cfg.tables.get(table)
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
        if sharding_types or compute_kernels or min_partition is not None:
            out[table] = ParameterConstraints(
                sharding_types=sharding_types or None,
                compute_kernels=compute_kernels or None,
                min_partition=min_partition,
            )
    return out


def _sharder_for(module_type: type, sharders: Iterable[ModuleSharder[nn.Module]]) -> ModuleSharder[nn.Module]:
    for s in sharders:
        if s.module_type is module_type:
            return s
    raise ValueError(f"no sharder for {module_type.__name__}; sharders: {[type(s).__name__ for s in sharders]}")


def _check_supported(
    constraints: Mapping[str, ParameterConstraints],
    tables: Mapping[str, TableMeta],
    sharders: list[ModuleSharder[nn.Module]],
    device_type: str,
) -> None:
    """Fails early, naming the table, when a constraint asks for what the table's sharder cannot do."""
    for table, c in constraints.items():
        meta = tables[table]
        sharder = _sharder_for(meta.module_type, sharders)
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


def plan(
    model: nn.Module,
    cfg: ShardingConfig,
    model_defaults: Mapping[str, "TableConstraint"],
    topology: Topology,
    sharders: list[ModuleSharder[nn.Module]],
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """The sharding plan of ``model``: loaded from ``cfg.plan_path`` or made by torchrec's planner.

    With a process group (``pg``, or the default group when initialised) rank 0 plans / reads the file and
    broadcasts, so every rank gets the same plan; without one the plan is made locally.

    Args:
        model: the (meta-device) train module to shard.
        cfg: the sharding section.
        model_defaults: the zoo entry's default constraints.
        topology: from :func:`build_topology`.
        sharders: from :func:`build_sharders`.
        pg: the process group; None = the default group if initialised.

    Raises:
        ValueError: bad constraints (see :func:`merge_constraints`), a constraint the sharders cannot meet,
            or a loaded plan that does not fit the model, the topology or the constraints.
    """
    tables = embedding_tables(model)
    constraints = merge_constraints(model_defaults, cfg, tables)
    _check_supported(constraints, tables, sharders, topology.compute_device)
    if pg is None and dist.is_initialized():
        pg = dist.GroupMember.WORLD
    if cfg.plan_path is not None:
        loaded = _broadcast_json(pg, lambda: json.loads(Path(str(cfg.plan_path)).read_text()))
        result = plan_from_json(loaded)
        check_plan(result, tables, topology, constraints, source=str(cfg.plan_path))
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


def check_plan(
    sharding_plan: ShardingPlan,
    tables: Mapping[str, TableMeta],
    topology: Topology,
    constraints: Optional[Mapping[str, ParameterConstraints]] = None,
    source: str = "plan",
) -> None:
    """Checks that a (loaded) plan shards exactly the model's tables, tiles each one, fits the topology and
    meets the constraints.

    Raises:
        ValueError: describing every mismatch found.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for module_path, module_plan in sharding_plan.plan.items():
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            problems.append(f"module {module_path!r}: not an embedding module plan ({type(module_plan).__name__})")
            continue
        for table, ps in module_plan.items():
            seen.add(table)
            meta = tables.get(table)
            if meta is None:
                problems.append(f"{module_path}.{table}: the model has no such table")
                continue
            if meta.module_path != module_path:
                problems.append(
                    f"{table}: planned under module {module_path!r}, the model has it in {meta.module_path!r}"
                )
            ranks = list(ps.ranks or [])
            if any(r < 0 or r >= topology.world_size for r in ranks):
                problems.append(f"{table}: ranks {ranks} outside world size {topology.world_size}")
            c = (constraints or {}).get(table)
            if c is not None and c.sharding_types and ps.sharding_type not in c.sharding_types:
                problems.append(
                    f"{table}: sharding type {ps.sharding_type!r} is not among the allowed {c.sharding_types}"
                )
            if c is not None and c.compute_kernels and ps.compute_kernel not in c.compute_kernels:
                problems.append(
                    f"{table}: compute kernel {ps.compute_kernel!r} is not among the allowed {c.compute_kernels}"
                )
            shards = _shards(ps)
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                continue
            if not shards:
                problems.append(f"{table}: {ps.sharding_type} without shard metadata")
                continue
            area = 0
            for s in shards:
                (r0, c0), (nr, nc) = s.shard_offsets, s.shard_sizes
                if r0 < 0 or c0 < 0 or r0 + nr > meta.rows or c0 + nc > meta.dim:
                    problems.append(
                        f"{table}: shard at {s.shard_offsets} of size {s.shard_sizes} exceeds the table's"
                        f" [{meta.rows}, {meta.dim}]"
                    )
                area += nr * nc
                placement = s.placement
                if placement is not None and placement.device().type != topology.compute_device:
                    problems.append(f"{table}: shard placed on {placement}, the topology is {topology.compute_device}")
            if area != meta.rows * meta.dim:
                problems.append(f"{table}: shards cover {area} elements, the table has {meta.rows} x {meta.dim}")
    missing = [t for t in tables if t not in seen]
    if missing:
        problems.append(f"tables of the model missing from the plan: {missing}")
    if problems:
        raise ValueError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))


def shard_model(
    model: nn.Module,
    sharding_plan: ShardingPlan,
    sharders: list[ModuleSharder[nn.Module]],
    device: torch.device,
    pg: Optional[dist.ProcessGroup] = None,
) -> DistributedModelParallel:
    """Wraps ``model`` in DistributedModelParallel following ``sharding_plan``.

    The model is normally on the meta device: DMP materialises the shards of every table on ``device`` and
    initialises them with the tables' ``init_fn`` (local RNG: seed before calling), materialises and
    initialises the dense parameters (``reset_parameters``), then wraps the dense part in DDP (which
    broadcasts rank 0's dense weights). Apply ``apply_optimizer_in_backward`` before calling this to fuse the
    embedding optimizer into the backward pass.

    Args:
        pg: the process group; None = the default group (which must be initialised).
    """
    if pg is None:
        if not dist.is_initialized():
            raise RuntimeError("shard_model needs a process group: call torch.distributed.init_process_group first")
        pg = dist.GroupMember.WORLD
    assert pg is not None
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=sharding_plan,
        sharders=sharders,
    )


# ---------------------------------------------------------------------------------------------------- plan files


def _enum_name(e: Any) -> Optional[str]:
    return None if e is None else e.name


def _cache_params_to_json(c: Optional[CacheParams], where: str) -> Optional[dict[str, Any]]:
    if c is None:
        return None
    if c.stats is not None:
        raise ValueError(f"{where}: cache_params.stats (planner statistics) cannot be written to JSON")
    return {
        "algorithm": _enum_name(c.algorithm),
        "load_factor": c.load_factor,
        "reserved_memory": c.reserved_memory,
        "precision": _enum_name(c.precision),
        "prefetch_pipeline": c.prefetch_pipeline,
        "multipass_prefetch_config": (
            None if c.multipass_prefetch_config is None else dict(c.multipass_prefetch_config._asdict())
        ),
    }


def _cache_params_from_json(d: Optional[Mapping[str, Any]]) -> Optional[CacheParams]:
    if d is None:
        return None
    mp = d.get("multipass_prefetch_config")
    return CacheParams(
        algorithm=None if d.get("algorithm") is None else CacheAlgorithm[d["algorithm"]],
        load_factor=d.get("load_factor"),
        reserved_memory=d.get("reserved_memory"),
        precision=None if d.get("precision") is None else DataType[d["precision"]],
        prefetch_pipeline=d.get("prefetch_pipeline"),
        multipass_prefetch_config=None if mp is None else MultiPassPrefetchConfig(**mp),
    )


def _shards(ps: ParameterSharding) -> Optional[list[ShardMetadata]]:
    spec = ps.sharding_spec
    if spec is None:
        return None
    if not isinstance(spec, EnumerableShardingSpec):
        raise ValueError(f"only EnumerableShardingSpec is supported, got {type(spec).__name__}")
    return list(spec.shards)


def plan_to_json(sharding_plan: ShardingPlan) -> dict[str, Any]:
    """A JSON-able dict: module path -> table -> its sharding.

    Each table: ``sharding_type``, ``compute_kernel``, ``ranks`` (list or null), ``shards`` (null for
    data-parallel, else a list of ``{"shard_offsets": [row, col], "shard_sizes": [rows, cols], "placement":
    "rank:R/cpu"}`` (``rank:R/cuda:L`` on GPUs), the keys torchrec's own ``ShardingPlan._serialize`` uses),
    ``cache_params`` (null or its fields, enums by name), ``enforce_hbm``, ``stochastic_rounding``,
    ``bounds_check_mode`` and ``output_dtype`` (enums by name, or null). :func:`plan_from_json` inverts it
    exactly.

    Raises:
        ValueError: the plan has a non-embedding module plan, a non-enumerable sharding spec, or SSD /
            parameter-server ``key_value_params`` (not supported here).
    """
    out: dict[str, Any] = {}
    for module_path, module_plan in sharding_plan.plan.items():
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            raise ValueError(f"module {module_path!r}: cannot write a {type(module_plan).__name__}")
        tables: dict[str, Any] = {}
        for table, ps in module_plan.items():
            where = f"{module_path}.{table}"
            if ps.key_value_params is not None:
                raise ValueError(f"{where}: key_value_params (SSD / parameter server) cannot be written to JSON")
            shards = _shards(ps)
            tables[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": None if ps.ranks is None else [int(r) for r in ps.ranks],
                "shards": None
                if shards is None
                else [
                    {
                        "shard_offsets": [int(x) for x in s.shard_offsets],
                        "shard_sizes": [int(x) for x in s.shard_sizes],
                        "placement": None if s.placement is None else str(s.placement),
                    }
                    for s in shards
                ],
                "cache_params": _cache_params_to_json(ps.cache_params, where),
                "enforce_hbm": ps.enforce_hbm,
                "stochastic_rounding": ps.stochastic_rounding,
                "bounds_check_mode": _enum_name(ps.bounds_check_mode),
                "output_dtype": _enum_name(ps.output_dtype),
            }
        out[module_path] = tables
    return out


_TABLE_KEYS = {
    "sharding_type",
    "compute_kernel",
    "ranks",
    "shards",
    "cache_params",
    "enforce_hbm",
    "stochastic_rounding",
    "bounds_check_mode",
    "output_dtype",
}


def plan_from_json(d: Mapping[str, Any]) -> ShardingPlan:
    """The ShardingPlan that :func:`plan_to_json` wrote (``plan_from_json(plan_to_json(p)) == p``).

    Raises:
        ValueError: a table entry lacks ``sharding_type`` / ``compute_kernel`` or has unknown keys, or names
            an unknown sharding type.
    """
    modules: dict[str, Any] = {}
    for module_path, tables in d.items():
        module_plan = EmbeddingModuleShardingPlan()
        for table, t in tables.items():
            where = f"{module_path}.{table}"
            unknown = sorted(set(t) - _TABLE_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(_TABLE_KEYS)}")
            for key in ("sharding_type", "compute_kernel"):
                if key not in t:
                    raise ValueError(f"{where}: missing {key!r}")
            _check_names(where, [t["sharding_type"]], SHARDING_TYPES, "sharding type")
            _check_names(where, [t["compute_kernel"]], COMPUTE_KERNELS, "compute kernel")
            shards = t.get("shards")
            module_plan[table] = ParameterSharding(
                sharding_type=t["sharding_type"],
                compute_kernel=t["compute_kernel"],
                ranks=None if t.get("ranks") is None else [int(r) for r in t["ranks"]],
                sharding_spec=None
                if shards is None
                else EnumerableShardingSpec(
                    [
                        ShardMetadata(
                            shard_offsets=[int(x) for x in s["shard_offsets"]],
                            shard_sizes=[int(x) for x in s["shard_sizes"]],
                            placement=s.get("placement"),
                        )
                        for s in shards
                    ]
                ),
                cache_params=_cache_params_from_json(t.get("cache_params")),
                enforce_hbm=t.get("enforce_hbm"),
                stochastic_rounding=t.get("stochastic_rounding"),
                bounds_check_mode=(
                    None if t.get("bounds_check_mode") is None else BoundsCheckMode[t["bounds_check_mode"]]
                ),
                output_dtype=None if t.get("output_dtype") is None else DataType[t["output_dtype"]],
            )
        modules[module_path] = module_plan
    return ShardingPlan(plan=modules)


def plan_table(
    sharding_plan: ShardingPlan,
    tables: Union[Mapping[str, TableMeta], nn.Module, None] = None,
) -> str:
    """A fixed-width text table of the plan, one line per table, then the bytes per rank.

    Columns: module, table, rows, dim, sharding type, kernel, ranks, shards (``rank:rows x cols`` for each
    shard), bytes per rank (``rank:bytes``, weights only: optimizer state is not counted).

    Args:
        tables: the model's tables (:func:`embedding_tables`), or a model / DMP to take them from. Without
            them, sizes come from the shard metadata, data-parallel tables show ``?`` and fp32 is assumed.
    """
    metas: Mapping[str, TableMeta] = (
        embedding_tables(tables) if isinstance(tables, nn.Module) else (tables if tables is not None else {})
    )
    world = 1
    for module_plan in sharding_plan.plan.values():
        for ps in module_plan.values():  # type: ignore[attr-defined]
            for s in _shards(ps) or []:
                if s.placement is not None:
                    world = max(world, int(s.placement.rank()) + 1)
            world = max(world, *(int(r) + 1 for r in (ps.ranks or [0])))
    totals = [0] * world
    header = ["module", "table", "rows", "dim", "sharding", "kernel", "ranks", "shards", "bytes/rank"]
    rows: list[list[str]] = []
    for module_path, module_plan in sharding_plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            meta = metas.get(table)
            shards = _shards(ps)
            elem = meta.bytes_per_element if meta is not None else 4
            if meta is not None:
                n_rows, dim = str(meta.rows), str(meta.dim)
            elif shards:
                n_rows = str(max(s.shard_offsets[0] + s.shard_sizes[0] for s in shards))
                dim = str(max(s.shard_offsets[1] + s.shard_sizes[1] for s in shards))
            else:
                n_rows, dim = "?", "?"
            per_rank = [0] * world
            if shards is None:  # data parallel: a full replica on every rank
                shard_text = f"all:{n_rows}x{dim}"
                if meta is not None:
                    per_rank = [meta.rows * meta.dim * elem] * world
            else:
                parts = []
                for s in shards:
                    r = int(s.placement.rank()) if s.placement is not None else -1
                    parts.append(f"{r}:{s.shard_sizes[0]}x{s.shard_sizes[1]}")
                    if r >= 0:
                        per_rank[r] += s.shard_sizes[0] * s.shard_sizes[1] * elem
                shard_text = " ".join(parts)
            totals = [a + b for a, b in zip(totals, per_rank)]
            rows.append(
                [
                    module_path,
                    table,
                    n_rows,
                    dim,
                    ps.sharding_type,
                    ps.compute_kernel,
                    ",".join(str(r) for r in ps.ranks) if ps.ranks else "all",
                    shard_text,
                    " ".join(f"{r}:{b}" for r, b in enumerate(per_rank) if b),
                ]
            )
    rows.append(["total", "", "", "", "", "", "", "", " ".join(f"{r}:{b}" for r, b in enumerate(totals))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric = {2, 3}

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines) + "\n"


def write_plan(run_dir: Union[str, Path], sharding_plan: ShardingPlan, text: Optional[str] = None) -> Path:
    """Writes ``<run_dir>/plan.json`` (:func:`plan_to_json`) and ``<run_dir>/plan.txt`` (``text``, default
    :func:`plan_table` without table metadata). Call it on one rank only. Returns the JSON's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan_to_json(sharding_plan), indent=2) + "\n")
    (run_dir / "plan.txt").write_text(text if text is not None else plan_table(sharding_plan))
    return path


def read_plan(path: Union[str, Path]) -> ShardingPlan:
    """Reads a ``plan.json`` written by :func:`write_plan` (no checks against a model: see :func:`plan`)."""
    return plan_from_json(json.loads(Path(path).read_text()))
