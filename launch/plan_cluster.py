"""Plan a zoo entry's embedding tables for a target cluster without allocating them (dry-run planning).

The model is built on the meta device (no table is allocated: a 10^9-row table costs nothing here), and
torchrec's planner (``EmbeddingShardingPlanner``, the same constraints as training: the entry's defaults and
``sharding.tables``) plans it for the cluster in ``sharding.cluster`` (:class:`launch.planning.ClusterConfig`:
world size, ranks per host, device, HBM / DDR per rank, bandwidths), not for this machine.

    python -m launch.plan_cluster --config <exp.yaml> [--table-rows item_id=1000000000 ...] [--out plan.json]
        [sharding.cluster.world_size=128 sharding.cluster.local_world_size=8 sharding.cluster.hbm_gib=80 ...]

It prints the plan (per table: sharding type, compute kernel, ranks, shard sizes, bytes per rank), then per
rank the planner's storage (HBM, DDR; weights and optimizer state as the planner estimates them) and its cost
estimate (the sum of the rank's shards' forward + backward + communication estimates, ms per step), and the
bottleneck rank (the largest estimate); and writes all of it as JSON (``--out``, default
``<run_dir>/cluster_plan.json``): ``plan`` (the ``plan.json`` format, each table's precision stated:
``sharding.plan_path`` of a run on that cluster can load it), ``tables`` (rows, dim, precision), ``ranks``,
``bottleneck_rank``, ``cluster``, ``planning_s``.

A table's ``sharding.tables.<key>.precision`` (``fp16``) is applied before planning: the planner sizes its
shards (and the optimizer state it derives from them) for 2-byte rows.

The planner counts the fused sparse optimizer's state (``optim``) in each shard's storage, as training's does;
``optim.sparse=replicated_adam`` makes no plan in training and is refused here.

``--table-rows TABLE=ROWS`` (repeatable) sets the rows of a table (every feature of it) without data: plan production-size
tables from a small experiment's config. With ``sharding.plan_path`` the pinned plan is checked against the
model, the cluster and the constraints instead (exit 2 with the reason when it does not fit).

Exit codes: 0 planned; 2 a config error, or no plan fits the cluster (the message says what does not fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import PlannerError

from torchrec.distributed.planner import Topology

from launch.config import ConfigError, ExperimentConfig, load_config, validate_experiment
from launch.plan_files import check_plan, plan_from_json, plan_precisions, plan_table, plan_to_json, precision_name
from launch.optim import apply_sparse_optimizers, replicated
from launch.planning import ShardingConfig, cluster_topology, prepare_tables
from launch.sharders import build_sharders
from models.registry import ModelSpec


def _set_rows(schema: Any, table_rows: Sequence[str]) -> Any:
    """The schema with ``TABLE=ROWS`` applied to every id feature of each named table."""
    for item in table_rows:
        table, sep, rows = item.partition("=")
        try:
            n = int(float(rows)) if sep else -1
        except ValueError:
            n = -1
        if n <= 0:
            raise ConfigError(f"--table-rows {item!r}: expected TABLE=ROWS with ROWS a positive integer (1e9 allowed)")
        hit = [f for f in schema.id_features if (f.table or f.name) == table]
        if not hit:
            known = sorted({f.table or f.name for f in schema.id_features})
            raise ConfigError(f"--table-rows {item!r}: no table {table!r} in data.schema; tables are {known}")
        for f in hit:
            f.num_embeddings = n
    return schema


def rank_report(options: Sequence[Any], world_size: int) -> list[dict[str, Any]]:
    """Per rank: the planner's storage (HBM, DDR bytes) and cost estimate (ms) summed over its shards.

    Args:
        options: the planner's chosen sharding options (each with ``shards``, each shard with ``rank``,
            ``storage`` and ``perf``).
    """
    ranks = [{"rank": r, "hbm_bytes": 0, "ddr_bytes": 0, "cost_ms": 0.0, "shards": 0} for r in range(world_size)]
    for option in options:
        for shard in option.shards:
            if shard.rank is None:
                continue
            r = ranks[shard.rank]
            r["shards"] += 1
            if shard.storage is not None:
                r["hbm_bytes"] += int(shard.storage.hbm)
                r["ddr_bytes"] += int(shard.storage.ddr)
            if shard.perf is not None:
                r["cost_ms"] += float(shard.perf.total)
    return ranks


def plan_estimates(cfg: ExperimentConfig, spec: ModelSpec, topology: Topology,
                   sharding: Optional[ShardingConfig] = None) -> dict[str, Any]:
    """Plans ``cfg``'s model on meta for ``topology`` with torchrec's planner, as training plans it (the fused
    sparse optimizers and the tables' precisions applied first, the same constraints), and reports the
    planner's estimates: the report of the module docstring without ``cluster`` / ``run_dir``.

    Args:
        sharding: the sharding section to plan with (default ``cfg.sharding``; ``launch.plan_compare`` passes
            each candidate's).

    Raises:
        ConfigError: replicated tables, bad constraints, no plan that fits (or a pinned plan that does not).
    """
    sharding = sharding if sharding is not None else cfg.sharding
    model = spec.build_train_module(spec.build(cfg.model, cfg.data.schema, torch.device("meta")), cfg.model)
    # As training does: the fused sparse optimizers first, so that the planner counts their state per shard.
    settings = apply_sparse_optimizers(model, cfg.optim)
    if replicated(cfg.optim, settings):
        raise ConfigError(
            "optim.sparse=replicated_adam replicates every table on every rank (training makes no sharding plan);"
            " plan with a fused sparse optimizer instead, e.g. optim.sparse=adam (cuda) or rowwise_adagrad"
        )
    sharders = build_sharders()
    try:
        tables, constraints = prepare_tables(model, sharding, spec.default_constraints(cfg.model, cfg.data.schema),
                                             sharders, topology.compute_device)
    except ValueError as e:
        raise ConfigError(f"sharding: {e}") from None
    options: Optional[list[Any]] = None
    start = time.perf_counter()
    if sharding.plan_path is not None:
        path = str(sharding.plan_path)
        loaded = json.loads(Path(path).read_text())
        sharding_plan = plan_from_json(loaded)
        try:
            check_plan(sharding_plan, tables, topology, constraints, source=path, precisions=plan_precisions(loaded))
        except ValueError as e:
            raise ConfigError(f"sharding.plan_path does not fit this cluster: {e}") from None
    else:
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=sharding.batch_size,
                                           constraints=constraints)
        try:
            sharding_plan = planner.plan(model, sharders)
        except PlannerError as e:
            storage, gib = topology.devices[0].storage, 1024**3
            raise ConfigError(
                f"no sharding plan fits the cluster ({topology.world_size} {topology.compute_device} ranks,"
                f" {storage.hbm / gib:.3g} GiB HBM and {storage.ddr / gib:.3g} GiB DDR per rank):"
                f" {str(e).splitlines()[0]}"
            ) from None
        # The chosen options carry the planner's per-shard storage and cost estimates (what torchrec's own
        # EmbeddingStats prints); the ShardingPlan keeps only placements.
        options = planner._best_plan  # noqa: SLF001
    seconds = time.perf_counter() - start
    ranks = rank_report(options, topology.world_size) if options is not None else []
    bottleneck = max(ranks, key=lambda r: r["cost_ms"])["rank"] if ranks else None
    return {
        "model": spec.name,
        "tables": {name: {"rows": t.rows, "dim": t.dim, "precision": precision_name(t)} for name, t in tables.items()},
        "planning_s": seconds,
        "planned": options is not None,
        "ranks": ranks,
        "bottleneck_rank": bottleneck,
        "plan": plan_to_json(sharding_plan, tables),
        "plan_text": plan_table(sharding_plan, tables),
    }


def plan_cluster(config: Path, overrides: Sequence[str], table_rows: Sequence[str]) -> dict[str, Any]:
    """Plans ``config``'s model for its ``sharding.cluster``; returns the report (module docstring).

    Raises:
        ConfigError: a bad config, or no plan that fits (or a pinned plan that does not).
    """
    cfg, spec, _ = load_config(config, list(overrides))
    cfg.data.schema = _set_rows(cfg.data.schema, table_rows)
    cluster = cfg.sharding.cluster
    try:
        cluster.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Checked for the cluster's device (the fused optimizers differ: adam exists on cuda only), not this machine's.
    validate_experiment(cfg, spec, plan_device=cluster.device)
    report = plan_estimates(cfg, spec, cluster_topology(cluster))
    return {**report, "cluster": dataclasses.asdict(cluster), "run_dir": str(cfg.run_dir)}


def format_report(report: dict[str, Any]) -> str:
    """The printed form: the plan table, then storage and cost per rank with the bottleneck marked."""
    c = report["cluster"]
    lines = [
        f"{report['model']} planned for {c['world_size']} {c['device']} ranks ({c['world_size'] // c['local_world_size']}"
        f" hosts x {c['local_world_size']}) in {report['planning_s']:.1f} s",
        report["plan_text"].rstrip(),
    ]
    if report["ranks"]:
        gib = 1024**3
        lines += ["", "rank  hbm GiB   ddr GiB   shards  cost ms (planner estimate)"]
        for r in report["ranks"]:
            mark = "  <- bottleneck" if r["rank"] == report["bottleneck_rank"] else ""
            lines.append(f"{r['rank']:>4}  {r['hbm_bytes'] / gib:8.2f}  {r['ddr_bytes'] / gib:8.2f}  {r['shards']:>6}"
                         f"  {r['cost_ms']:.4f}{mark}")
    else:
        lines.append("(pinned plan: checked against the cluster; no planner estimates)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plan_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--table-rows", action="append", default=[], metavar="TABLE=ROWS",
                        help="rows of a table (repeat the option for several tables)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default <run_dir>/cluster_plan.json)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    try:
        report = plan_cluster(args.config, args.overrides, args.table_rows)
    except (ConfigError, ValueError, KeyError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = args.out or Path(report["run_dir"]) / "cluster_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in report.items() if k != "plan_text"}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
