"""A 10^8-row embedding table, row-wise sharded, trains on 2 CPU ranks (claim from the Scale issue: it trains,
with memory per rank reported).

DIN (``configs/tests/din_tiny.yaml``'s model at ``--dim``) over the tiny synthetic data, with the item table
(``t_item_id``: target and behaviour items) at ``--rows`` rows, row-wise over the 2 gloo ranks, fused row-wise
Adagrad, and the item ids given as raw ids hashed into the table (``mapping: hash``: the ids of the data,
multiplied by a large odd constant to look like production 64-bit ids, land all over the 10^8 rows). Prints
samples/s, peak resident memory per rank and the table's bytes per rank from the plan.

    .venv/bin/python benchmarks/large_table.py [--rows 100000000] [--dim 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.runs import torchrun_train  # noqa: E402
from datasets.synthetic import SyntheticParams, generate  # noqa: E402

SCALE = 0x9E3779B1  # raw id = id * SCALE: sparse 64-bit-looking ids


def raw_ids(src: Path, dst: Path) -> None:
    """Copies the tiny data with item ids (target and history) turned into large raw ids."""
    for split in ("train", "eval"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / split).glob("*.parquet")):
            t = pq.read_table(f)
            item = pc.multiply(t.column("item_id"), pa.scalar(SCALE, pa.int64()))
            hist = t.column("hist_item_id").combine_chunks()
            flat = pc.multiply(hist.flatten(), pa.scalar(SCALE, pa.int64()))
            hist = pa.ListArray.from_arrays(hist.offsets, flat)
            t = t.set_column(t.schema.get_field_index("item_id"), "item_id", item)
            t = t.set_column(t.schema.get_field_index("hist_item_id"), "hist_item_id", hist)
            pq.write_table(t, dst / split / f.name, row_group_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/large_table")
    args = parser.parse_args()
    tiny, data = args.out / "data_tiny", args.out / "data_raw_ids"
    if not (tiny / "meta.json").is_file():
        generate(tiny, SyntheticParams(num_samples=8192, num_eval_samples=1024, num_users=200, num_items=1000,
                                       num_categories=50, max_seq_len=100, files=2, row_group_size=512, seed=0))
    if not (data / "train").is_dir():
        raw_ids(tiny, data)
    base = OmegaConf.load(ROOT / "configs/datasets/synthetic_tiny.yaml")
    for f in base.data.schema.id_features:
        if f.get("table") == "item_id":
            f.num_embeddings = args.rows
            f.mapping = "hash"
    exp = {
        "includes": [str(ROOT / "configs/tests/din_tiny.yaml")],
        "data": {"schema": base.data.schema, "train_paths": [f"{data}/train/*.parquet"],
                 "eval_paths": [f"{data}/eval/*.parquet"]},
        "model": {"embedding_dim": args.dim},
        "sharding": {"tables": {"t_item_id": {"sharding_types": ["row_wise"]}}},
        "optim": {"sparse": "rowwise_adagrad"},
        "train": {"max_steps": args.steps, "checkpoint_every": 0, "eval_every": 0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / f"large_table_{args.rows}.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(exp)))
    run_dir = args.out / f"run_{args.rows}_d{args.dim}"
    m = torchrun_train(str(config), run_dir, ["train.resume=false"], f"{args.rows}-row table")
    plan = json.loads((run_dir / "plan.json").read_text())
    shards = [s for tables in plan.values() for name, ps in tables.items() if name == "t_item_id" for s in ps["shards"]]
    per_rank = {s["placement"].split("/")[0]: s["shard_sizes"][0] * s["shard_sizes"][1] * 4 for s in shards}
    print(f"t_item_id: {args.rows:,} rows x {args.dim}, row-wise over 2 CPU ranks, fused row-wise Adagrad, "
          f"{m['steps']} steps of 2 x {m.get('batch_size', 64)}")
    print("| rows | samples/s | peak RSS per rank (MiB) | table weights per rank (MiB) | id_fixes | AUC |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.rows:,} | {m['samples_per_s']:,.0f} | {' / '.join(f'{x:,.0f}' for x in m['peak_rss_mib_per_rank'])} "
          f"| {' / '.join(f'{v / 2**20:,.0f}' for v in per_rank.values())} | {sum(m['id_fixes'].values())} "
          f"| {m['auc']:.4f} |")


if __name__ == "__main__":
    main()
