"""Sharding plans as files: ``plan.json`` (an exact round trip) and ``plan.txt`` (a readable table), and the
check of a loaded plan against the model (:func:`check_plan`).

``plan.json`` maps module path -> table name -> its sharding (:func:`plan_to_json`); every table also states
the schema table and role its name is made of (:func:`datasets.schema.parse_table_name`), so that a plan of
a model with several tables per feature reads without decoding names, and (when written with the model's
tables) the precision of its rows (``fp32`` / ``fp16``: a plan sized for fp16 rows does not load for fp32
ones). ``sharding.plan_path=<run_dir>/plan.json`` reuses a plan (:func:`launch.planning.plan` loads and
checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    CacheAlgorithm,
    MultiPassPrefetchConfig,
)
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
)
from torchrec.types import DataType

from datasets.schema import parse_table_name
from launch.sharders import COMPUTE_KERNELS, SHARDING_TYPES, TableMeta, check_names, embedding_tables

# Bytes per element of the precisions a table may state (``sharding.tables.<key>.precision``).
PRECISION_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
_PRECISION_OF_BYTES = {b: name for name, b in PRECISION_BYTES.items()}


def precision_name(meta: TableMeta) -> str:
    """``fp32`` / ``fp16`` / ``int8``: the precision of a table's rows, from its bytes per element."""
    return _PRECISION_OF_BYTES.get(meta.bytes_per_element, f"{meta.bytes_per_element * 8}-bit")


def _metas(tables: Union[Mapping[str, TableMeta], nn.Module, None]) -> Mapping[str, TableMeta]:
    return embedding_tables(tables) if isinstance(tables, nn.Module) else (tables if tables is not None else {})


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


def shard_metadata(ps: ParameterSharding) -> Optional[list[ShardMetadata]]:
    """The shards of one table's sharding (None for data-parallel, which has no sharding spec).

    Raises:
        ValueError: the spec is not an ``EnumerableShardingSpec`` (the only kind the planner makes).
    """
    spec = ps.sharding_spec
    if spec is None:
        return None
    if not isinstance(spec, EnumerableShardingSpec):
        raise ValueError(f"only EnumerableShardingSpec is supported, got {type(spec).__name__}")
    return list(spec.shards)


def _name_parts(name: str, where: str) -> tuple[str, Optional[str]]:
    try:
        return parse_table_name(name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def plan_to_json(
    sharding_plan: ShardingPlan,
    tables: Union[Mapping[str, TableMeta], nn.Module, None] = None,
) -> dict[str, Any]:
    """A JSON-able dict: module path -> table name -> its sharding.

    Each table: ``table`` and ``role`` (the parts of its name, ``role`` null for ``t_<table>``),
    ``sharding_type``, ``compute_kernel``, ``ranks`` (list or null), ``shards`` (null for data-parallel, else a
    list of ``{"shard_offsets": [row, col], "shard_sizes": [rows, cols], "placement": "rank:R/cpu"}``
    (``rank:R/cuda:L`` on GPUs), the keys torchrec's own ``ShardingPlan._serialize`` uses), ``cache_params``
    (null or its fields, enums by name), ``enforce_hbm``, ``stochastic_rounding``, ``bounds_check_mode`` and
    ``output_dtype`` (enums by name, or null). :func:`plan_from_json` inverts it exactly. With ``tables``,
    every table also states its ``precision`` (``fp32`` / ``fp16``, :func:`plan_precisions` reads it back).

    Args:
        tables: the model's tables (:func:`launch.sharders.embedding_tables`), or a model / DMP to take them
            from; None leaves ``precision`` out.

    Raises:
        ValueError: the plan has a non-embedding module plan, a table name that
            :func:`datasets.schema.table_name` does not give, a non-enumerable sharding spec, or SSD /
            parameter-server ``key_value_params`` (not supported here).
    """
    metas = _metas(tables)
    out: dict[str, Any] = {}
    for module_path, module_plan in sharding_plan.plan.items():
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            raise ValueError(f"module {module_path!r}: cannot write a {type(module_plan).__name__}")
        entries: dict[str, Any] = {}
        for name, ps in module_plan.items():
            where = f"{module_path}.{name}"
            table, role = _name_parts(name, where)
            if ps.key_value_params is not None:
                raise ValueError(f"{where}: key_value_params (SSD / parameter server) cannot be written to JSON")
            shards = shard_metadata(ps)
            entries[name] = {
                "table": table,
                "role": role,
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
            if name in metas:
                entries[name]["precision"] = precision_name(metas[name])
        out[module_path] = entries
    return out


_TABLE_KEYS = {
    "table",
    "role",
    "sharding_type",
    "compute_kernel",
    "ranks",
    "shards",
    "cache_params",
    "enforce_hbm",
    "stochastic_rounding",
    "bounds_check_mode",
    "output_dtype",
    "precision",
}


def plan_from_json(d: Mapping[str, Any]) -> ShardingPlan:
    """The ShardingPlan that :func:`plan_to_json` wrote (``plan_from_json(plan_to_json(p)) == p``).

    ``table`` / ``role`` may be absent (plans written before they existed); when present they must be the
    parts of the entry's name. ``precision`` (optional) is not part of a ShardingPlan: :func:`plan_precisions`
    reads it, :func:`check_plan` compares it with the model's tables.

    Raises:
        ValueError: a table entry lacks ``sharding_type`` / ``compute_kernel`` or has unknown keys, names an
            unknown sharding type, kernel or precision, or states a table / role its name does not have.
    """
    modules: dict[str, Any] = {}
    for module_path, tables in d.items():
        module_plan = EmbeddingModuleShardingPlan()
        for name, t in tables.items():
            where = f"{module_path}.{name}"
            unknown = sorted(set(t) - _TABLE_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(_TABLE_KEYS)}")
            for key in ("sharding_type", "compute_kernel"):
                if key not in t:
                    raise ValueError(f"{where}: missing {key!r}")
            if "table" in t or "role" in t:
                parts = _name_parts(name, where)
                stated = (t.get("table", parts[0]), t.get("role", parts[1]))
                if stated != parts:
                    raise ValueError(f"{where}: states table {stated[0]!r}, role {stated[1]!r}; the name has {parts}")
            check_names(where, [t["sharding_type"]], SHARDING_TYPES, "sharding type")
            check_names(where, [t["compute_kernel"]], COMPUTE_KERNELS, "compute kernel")
            if t.get("precision") is not None:
                check_names(where, [t["precision"]], tuple(PRECISION_BYTES), "precision")
            shards = t.get("shards")
            module_plan[name] = ParameterSharding(
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


def plan_precisions(d: Mapping[str, Any]) -> dict[str, str]:
    """Table name -> the ``precision`` a ``plan.json`` states for it (tables without one are left out)."""
    return {
        name: str(t["precision"])
        for tables in d.values()
        for name, t in tables.items()
        if isinstance(t, Mapping) and t.get("precision") is not None
    }


_HEADER = ["module", "name", "table", "role", "rows", "dim", "dtype", "sharding", "kernel", "ranks", "shards",
           "bytes/rank"]


def _world_size(sharding_plan: ShardingPlan) -> int:
    world = 1
    for module_plan in sharding_plan.plan.values():
        for ps in module_plan.values():  # type: ignore[attr-defined]
            for s in shard_metadata(ps) or []:
                if s.placement is not None:
                    world = max(world, int(s.placement.rank()) + 1)
            world = max(world, *(int(r) + 1 for r in (ps.ranks or [0])))
    return world


def plan_table(
    sharding_plan: ShardingPlan,
    tables: Union[Mapping[str, TableMeta], nn.Module, None] = None,
) -> str:
    """A fixed-width text table of the plan, one line per table, then the bytes per rank.

    Columns: module, name (``t_item_id__attn``), table and role (its parts: ``item_id``, ``attn``; ``-`` for
    no role), rows, dim, dtype (the rows' precision: ``fp32``, ``fp16``), sharding type, kernel, ranks, shards
    (``rank:rows x cols`` for each shard), bytes per rank (``rank:bytes``, weights only: optimizer state is
    not counted).

    Args:
        tables: the model's tables (:func:`launch.sharders.embedding_tables`), or a model / DMP to take them
            from. Without them, sizes come from the shard metadata, data-parallel tables and the dtype show
            ``?`` and fp32 is assumed for bytes.

    Raises:
        ValueError: a table name is not one :func:`datasets.schema.table_name` gives.
    """
    metas = _metas(tables)
    world = _world_size(sharding_plan)
    totals = [0] * world
    rows: list[list[str]] = []
    for module_path, module_plan in sharding_plan.plan.items():
        for name, ps in module_plan.items():  # type: ignore[attr-defined]
            table, role = _name_parts(name, f"{module_path}.{name}")
            meta = metas.get(name)
            shards = shard_metadata(ps)
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
                    name,
                    table,
                    role or "-",
                    n_rows,
                    dim,
                    precision_name(meta) if meta is not None else "?",
                    ps.sharding_type,
                    ps.compute_kernel,
                    ",".join(str(r) for r in ps.ranks) if ps.ranks else "all",
                    shard_text,
                    " ".join(f"{r}:{b}" for r, b in enumerate(per_rank) if b),
                ]
            )
    header = _HEADER
    rows.append(["total"] + [""] * (len(header) - 2) + [" ".join(f"{r}:{b}" for r, b in enumerate(totals))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric = {header.index("rows"), header.index("dim")}

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1])]) + "\n"


def write_plan(
    run_dir: Union[str, Path],
    sharding_plan: ShardingPlan,
    text: Optional[str] = None,
    tables: Union[Mapping[str, TableMeta], nn.Module, None] = None,
) -> Path:
    """Writes ``<run_dir>/plan.json`` (:func:`plan_to_json`; with ``tables`` it states each table's precision)
    and ``<run_dir>/plan.txt`` (``text``, default :func:`plan_table` of ``tables``). Call it on one rank only.
    Returns the JSON's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan_to_json(sharding_plan, tables), indent=2) + "\n")
    (run_dir / "plan.txt").write_text(text if text is not None else plan_table(sharding_plan, tables))
    return path


def _ranks_text(ranks: list[int]) -> str:
    return f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)" if len(ranks) > 8 else str(ranks)


def check_plan(
    sharding_plan: ShardingPlan,
    tables: Mapping[str, TableMeta],
    topology: Topology,
    constraints: Optional[Mapping[str, ParameterConstraints]] = None,
    source: str = "plan",
    precisions: Optional[Mapping[str, str]] = None,
) -> None:
    """Checks that a (loaded) plan shards exactly the model's tables, tiles each one, fits the topology and
    meets the constraints.

    Args:
        precisions: table -> the precision the plan file states (:func:`plan_precisions`); each must be the
            model's table's (the plan's storage was sized for it).

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
            stated = (precisions or {}).get(table)
            if stated is not None and stated != precision_name(meta):
                problems.append(
                    f"{table}: the plan was made for {stated} rows, the model's table is {precision_name(meta)}"
                    " (sharding.tables.<key>.precision)"
                )
            ranks = list(ps.ranks or [])
            if any(r < 0 or r >= topology.world_size for r in ranks):
                problems.append(f"{table}: ranks {ranks} outside world size {topology.world_size}")
            elif ps.sharding_type == ShardingType.ROW_WISE.value and ranks != list(range(topology.world_size)):
                # torchrec's row-wise sharding buckets ids over every rank of the world, shard r on rank r.
                problems.append(
                    f"{table}: row_wise over ranks {_ranks_text(ranks)}; row-wise needs shard r on rank r for each"
                    f" of the {topology.world_size} ranks, in order"
                )
            c = (constraints or {}).get(table)
            if c is not None and c.sharding_types and ps.sharding_type not in c.sharding_types:
                problems.append(
                    f"{table}: sharding type {ps.sharding_type!r} is not among the allowed {c.sharding_types}"
                )
            if c is not None and c.compute_kernels and ps.compute_kernel not in c.compute_kernels:
                problems.append(
                    f"{table}: compute kernel {ps.compute_kernel!r} is not among the allowed {c.compute_kernels}"
                )
            shards = shard_metadata(ps)
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
