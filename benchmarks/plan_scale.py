"""Dry-run planning at production scale (claim: DARE's item attention table 10^9 x 32 and representation table
10^9 x 128 plan on 64 and 128 GPUs in under a minute).

``launch.plan_cluster.plan_cluster`` on ``configs/experiments/dare_synthetic_long.yaml`` with
``model.attn_dim=32 model.repr_dim=128``, the item table at 10^9 rows (``--table-rows item_id=1e9``), for a
cluster of 8 GPUs per host with 80 GiB HBM and 512 GiB DDR per rank, fused Adam on the tables
(``optim.sparse=adam``: its two moments counted in each shard's storage); one process, meta tensors (nothing is
allocated). Prints, per world size, the planning time, the sharding chosen for the two item tables, the
planner's HBM per rank (max) and its cost estimate of the bottleneck rank.

    .venv/bin/python benchmarks/plan_scale.py [--world-sizes 64 128] [--rows 1e9]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.plan_cluster import plan_cluster  # noqa: E402

CONFIG = ROOT / "configs/experiments/dare_synthetic_long.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rows", default="1e9")
    parser.add_argument("--hbm-gib", type=float, default=80)
    args = parser.parse_args()
    print(f"DARE item tables {float(args.rows):.0e} x 32 (attention) and x 128 (representation), 8 GPUs per host, "
          f"{args.hbm_gib:g} GiB HBM per rank")
    print("| world size | planning s | t_item_id__attn | t_item_id__repr | max HBM per rank GiB | bottleneck rank | its cost ms |")
    print("|---|---|---|---|---|---|---|")
    for world in args.world_sizes:
        overrides = ["model.attn_dim=32", "model.repr_dim=128", "optim.sparse=adam", f"sharding.cluster.world_size={world}",
                     "sharding.cluster.local_world_size=8", "sharding.cluster.device=cuda",
                     f"sharding.cluster.hbm_gib={args.hbm_gib}", "sharding.cluster.ddr_gib=512"]
        r = plan_cluster(CONFIG, overrides, [f"item_id={args.rows}"])
        modules = r["plan"]  # module path -> table -> placement
        kinds = {}
        for tables in modules.values():
            for name, ps in (tables.items() if isinstance(tables, dict) else []):
                if isinstance(ps, dict) and name.startswith("t_item_id__"):
                    kinds[name] = f"{ps.get('sharding_type')} / {ps.get('compute_kernel')}"
        hbm = max(x["hbm_bytes"] for x in r["ranks"]) / 1024**3
        worst = r["ranks"][r["bottleneck_rank"]]
        print(f"| {world} | {r['planning_s']:.1f} | {kinds.get('t_item_id__attn', '?')} | {kinds.get('t_item_id__repr', '?')} "
              f"| {hbm:.1f} | {r['bottleneck_rank']} | {worst['cost_ms']:.3f} |")


if __name__ == "__main__":
    main()
