"""Compare candidate sharding constraints side by side: torchrec's planner estimates and, optionally, measured
step times (``python -m launch.plan_compare``).

Candidates are named alternatives to ``sharding.tables`` in the experiment's config
(:class:`launch.planning.ShardingCandidate`)::

    sharding:
      candidates:
        table_wise: {tables: {"t_*": {sharding_types: [table_wise]}}}
        row_wise:   {tables: {"t_*": {sharding_types: [row_wise]}}}
        fp16_rows:  {tables: {"t_*": {sharding_types: [row_wise], precision: fp16}}}

A candidate's entries replace the ``sharding.tables`` entries of the same key (whole entries) and add the
others. Each candidate is planned on the meta device by torchrec's planner exactly as training plans
(:func:`launch.plan_cluster.plan_estimates`: fused sparse optimizers and precisions applied, the model's
default constraints), for ``--nproc`` local ranks of ``train.device`` (the ranks ``--measure`` runs on), or with
``--cluster`` for the target cluster of ``sharding.cluster``::

    python -m launch.plan_compare --config <exp.yaml> [--nproc 2 | --cluster] [--table-rows item_id=1e9 ...]
        [--measure [--steps 20]] [--out-dir DIR] [key.sub=value ...]

It prints one column per candidate: each table's sharding type and kernel (and precision when not fp32), the
planner's cost estimate per rank (ms per step: the sum of the rank's shards' forward, backward and
communication estimates) with the bottleneck rank, and the planner's storage per rank (HBM / DDR, weights and
optimizer state as it estimates them). ``--measure`` trains each candidate's plan for ``--steps`` steps with the
real trainer (``launch.train`` under torchrun on ``--nproc`` local ranks, the plan pinned as
``sharding.plan_path``) and adds the median step time (rank 0's wall time between consecutive steps'
TensorBoard events, the first step excluded) and the run's mean. Everything is also written to
``<out-dir>/compare.json`` (default ``<run_dir>/plan_compare``), each candidate's plan to
``<out-dir>/<name>/plan.json`` (usable as ``sharding.plan_path``).

Exit codes: 0 compared; 2 a config error (no candidates, a bad candidate, a plan that does not fit) or a
measured run that failed (its stderr's tail is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from launch.config import ConfigError, dump_config, load_config, validate_experiment
from launch.plan_cluster import _set_rows, plan_estimates
from launch.planning import ShardingConfig, build_topology, cluster_topology, select_tables
from launch.sharders import embedding_tables

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def candidate_shardings(sharding: ShardingConfig, tables: Sequence[str]) -> dict[str, ShardingConfig]:
    """Name -> the sharding section each candidate plans with (its entries over ``sharding.tables``).

    Args:
        sharding: the experiment's sharding section (with ``candidates``).
        tables: the model's table names, for the candidates' keys.

    Raises:
        ConfigError: no candidates, a candidate name that is not a plain name, a key that selects no table,
            or a bad value (naming the candidate, key and field).
    """
    if not sharding.candidates:
        raise ConfigError(
            "sharding.candidates is empty: name at least one candidate, e.g."
            " sharding.candidates.row_wise.tables.t_item_id.sharding_types=[row_wise]"
        )
    if sharding.plan_path is not None:
        raise ConfigError("sharding.plan_path pins one plan; plan_compare plans every candidate: drop sharding.plan_path")
    try:
        sharding.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out: dict[str, ShardingConfig] = {}
    for name, candidate in sharding.candidates.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"sharding.candidates: {name!r} is not a plain name (letters, digits, _ . -)")
        if not candidate.tables:
            raise ConfigError(f"sharding.candidates.{name}.tables is empty: a candidate sets at least one table's entry")
        try:
            select_tables(candidate.tables, tables, where=f"sharding.candidates.{name}.tables")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out[name] = dataclasses.replace(sharding, tables={**sharding.tables, **candidate.tables}, candidates={})
    return out


def _table_choices(plan_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: {k: t.get(k) for k in ("sharding_type", "compute_kernel", "precision", "ranks")}
        for tables in plan_json.values()
        for name, t in tables.items()
    }


def compare(
    config: Path,
    overrides: Sequence[str],
    nproc: int = 2,
    cluster: bool = False,
    table_rows: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, ShardingConfig], DictConfig]:
    """Plans every candidate of ``config``; returns the report (module docstring), the candidates' sharding
    sections and the resolved config (for :func:`measure`).

    Raises:
        ConfigError: see the module docstring.
    """
    cfg, spec, resolved = load_config(config, list(overrides))
    cfg.data.schema = _set_rows(cfg.data.schema, table_rows)
    if cluster:
        try:
            cfg.sharding.cluster.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        topology = cluster_topology(cfg.sharding.cluster)
        target = {"source": "sharding.cluster", **dataclasses.asdict(cfg.sharding.cluster)}
    else:
        if nproc <= 0:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        topology = build_topology(nproc, nproc, torch.device(cfg.train.device.value), cfg.sharding)
        target = {"source": "local", "world_size": nproc, "local_world_size": nproc, "device": cfg.train.device.value}
    validate_experiment(cfg, spec, plan_device=cfg.sharding.cluster.device if cluster else None)
    names = list(embedding_tables(spec.build_train_module(spec.build(cfg.model, cfg.data.schema,
                                                                     torch.device("meta")), cfg.model)))
    shardings = candidate_shardings(cfg.sharding, names)
    candidates: dict[str, Any] = {}
    for name, sharding in shardings.items():
        try:
            r = plan_estimates(cfg, spec, topology, sharding)
        except ConfigError as e:
            raise ConfigError(f"sharding.candidates.{name}: {e}") from None
        ranks = r["ranks"]
        candidates[name] = {
            "tables": _table_choices(r["plan"]),
            "ranks": ranks,
            "bottleneck_rank": r["bottleneck_rank"],
            "bottleneck_cost_ms": max(x["cost_ms"] for x in ranks),
            "planning_s": r["planning_s"],
            "plan": r["plan"],
            "plan_text": r["plan_text"],
            "measured": None,
        }
    report = {"model": spec.name, "target": target, "tables": names, "candidates": candidates,
              "run_dir": str(cfg.run_dir)}
    return report, shardings, resolved


def _step_times(tb_dir: Path) -> list[float]:
    """Seconds between consecutive ``train/loss`` events of rank 0 (one per step with ``train.log_every=1``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = sorted(acc.Scalars("train/loss"), key=lambda e: e.step)
    return [b.wall_time - a.wall_time for a, b in zip(events, events[1:])]


def measure(
    resolved: DictConfig,
    name: str,
    sharding: ShardingConfig,
    plan_path: Path,
    work_dir: Path,
    nproc: int,
    steps: int,
) -> dict[str, Any]:
    """Trains ``steps`` steps of the experiment with the pinned plan on ``nproc`` local ranks and times them.

    The run's config is the resolved experiment with the candidate's ``sharding.tables`` (so that precision
    and constraints match the plan), ``sharding.plan_path`` = the plan, one TensorBoard event per step, no
    checkpoints and no test split.

    Raises:
        ConfigError: the run failed (the tail of its stderr).
    """
    doc = OmegaConf.create(OmegaConf.to_container(resolved, resolve=True, enum_to_str=True))  # untyped: replaceable
    tables = {k: dataclasses.asdict(v) for k, v in sharding.tables.items()}
    run_dir = work_dir / "run"
    for key, value in {
        "run_dir": str(run_dir), "sharding.tables": tables, "sharding.candidates": {},
        "sharding.plan_path": str(plan_path), "train.max_steps": steps, "train.epochs": 0, "train.eval_every": 0,
        "train.evals_per_epoch": 0, "train.log_every": 1, "train.checkpoint_every": 0,
        "train.checkpoint_at_end": False, "train.resume": False, "train.progress_bar": False,
        "eval.keep_best": False, "data.test_paths": [],
    }.items():
        OmegaConf.update(doc, key, value, merge=False)
    config = work_dir / "config.yaml"
    config.write_text(dump_config(doc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "launch.train", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"--measure: candidate {name}'s run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    times = _step_times(run_dir / "tb")
    gbs = metrics["world_size"] * int(doc.data.batch_size)
    return {
        "steps": metrics["steps"],
        "median_step_ms": 1e3 * statistics.median(times),
        "mean_step_ms": 1e3 * gbs / metrics["samples_per_s"],
        "samples_per_s": metrics["samples_per_s"],
        "final_train_loss": metrics["final_train_loss"],
        "run_dir": str(run_dir),
    }


def _per_rank(values: list[float], fmt: str) -> str:
    """``rank:value`` for up to 4 ranks, else the largest (and its rank) and the smallest."""
    if len(values) <= 4:
        return " ".join(f"{r}:{v:{fmt}}" for r, v in enumerate(values))
    hi = max(range(len(values)), key=values.__getitem__)
    return f"max {values[hi]:{fmt}} (rank {hi}), min {min(values):{fmt}}"


def format_report(report: dict[str, Any]) -> str:
    """The printed form: one column per candidate (module docstring)."""
    t, cands = report["target"], report["candidates"]
    names = list(cands)
    rows: list[list[str]] = [["", *names]]
    for table in report["tables"]:
        cells = []
        for n in names:
            ch = cands[n]["tables"][table]
            extra = f" {ch['precision']}" if ch.get("precision") not in (None, "fp32") else ""
            cells.append(f"{ch['sharding_type']} {ch['compute_kernel']}{extra}")
        rows.append([table, *cells])
    rows.append(["cost ms/rank", *(_per_rank([r["cost_ms"] for r in cands[n]["ranks"]], ".4f") for n in names)])
    rows.append(["bottleneck", *(f"rank {cands[n]['bottleneck_rank']}: {cands[n]['bottleneck_cost_ms']:.4f} ms"
                                 for n in names)])
    peak = max((r[k] for n in names for r in cands[n]["ranks"] for k in ("hbm_bytes", "ddr_bytes")), default=0)
    unit, div = ("GiB", 1024**3) if peak >= 1024**3 else ("MiB", 1024**2)
    for kind in ("hbm", "ddr"):
        if any(r[f"{kind}_bytes"] for n in names for r in cands[n]["ranks"]):
            rows.append([f"{kind.upper()} {unit}/rank",
                         *(_per_rank([r[f"{kind}_bytes"] / div for r in cands[n]["ranks"]], ".2f") for n in names)])
    if any(cands[n]["measured"] for n in names):
        m = [cands[n]["measured"] for n in names]
        rows.append([f"step ms (median of {m[0]['steps'] - 1})", *(f"{x['median_step_ms']:.1f}" for x in m)])
        rows.append(["step ms (mean, run)", *(f"{x['mean_step_ms']:.1f}" for x in m)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['model']}: {len(names)} candidates planned for {t['world_size']} {t['device']} ranks"
             f" ({t['world_size'] // t['local_world_size']} hosts x {t['local_world_size']}, {t['source']})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plan_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to plan for (and --measure on)")
    parser.add_argument("--cluster", action="store_true", help="plan for sharding.cluster instead of local ranks")
    parser.add_argument("--table-rows", action="append", default=[], metavar="TABLE=ROWS",
                        help="rows of a table (repeat the option for several tables)")
    parser.add_argument("--measure", action="store_true", help="train each candidate's plan for --steps steps")
    parser.add_argument("--steps", type=int, default=20, help="steps per measured run (>= 3)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default <run_dir>/plan_compare")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    try:
        if args.measure and args.cluster:
            raise ConfigError("--measure trains on this machine's --nproc ranks: drop --cluster to measure")
        if args.measure and args.steps < 3:
            raise ConfigError(f"--steps must be >= 3 (the first step is not timed), got {args.steps}")
        if args.measure and args.table_rows:
            raise ConfigError("--measure trains on the config's data: drop --table-rows to measure")
        report, shardings, resolved = compare(args.config, args.overrides, args.nproc, args.cluster, args.table_rows)
        out_dir = args.out_dir or Path(report["run_dir"]) / "plan_compare"
        for name, c in report["candidates"].items():
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            path = (out_dir / name / "plan.json").resolve()
            path.write_text(json.dumps(c["plan"], indent=2) + "\n")
            if args.measure:
                print(f"[plan_compare] training {name} for {args.steps} steps on {args.nproc} ranks", flush=True)
                c["measured"] = measure(resolved, name, shardings[name], path, out_dir / name, args.nproc, args.steps)
    except (ConfigError, ValueError, KeyError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = out_dir / "compare.json"
    written = {**report, "candidates": {n: {k: v for k, v in c.items() if k != "plan_text"}
                                        for n, c in report["candidates"].items()}}
    out.write_text(json.dumps(written, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
