"""DARE's Table 1 on synthetic data with planted long-range structure (claim, from the paper: DARE best, TWIN
w/ proj worst, DARE's lead largest at small embedding dims).

One command trains DARE and every Table-1 baseline on the same data (``data/synthetic_long``, written by
``benchmarks/twin_synthetic.py``'s parameters unless it is there), same steps, at embedding dims 16 and 64,
for ``--seeds`` seeds, on 2 ranks, through ``configs/experiments/{dare,din_last50}_synthetic_long.yaml`` with
these variants of the ``dare`` entry (``configs/models/dare.yaml``):

| row | overrides |
|---|---|
| DARE | ``model.tables=2`` (attention and representation tables) |
| TWIN | ``model.tables=1`` (one shared table) |
| TWIN (hard) | ``model.tables=1 model.search=hard`` |
| TWIN w/ proj | ``model.tables=1 model.projection=true`` (linear projections to Q/K/V from the shared table) |
| TWIN w/o TR | ``model.tables=1 model.target_aware=false`` (no target-aware representation) |
| TWIN-4E | ``model.tables=4`` |
| DIN | ``din_last50_synthetic_long.yaml`` with ``model.history_length=200`` (DIN over the last 200) |

``attn_dim = repr_dim = dim`` (DIN: ``embedding_dim = dim``). It prints per dim the validation AUC of the best
checkpoint (mean, sd, per seed), the difference to DARE and the GSU's NDCG@100 against the planted relevance
(``hist_relevance``), and writes ``runs/dare_table/results.json``.

    .venv/bin/python benchmarks/dare_table.py                        # 7 rows x 2 dims x 3 seeds, the configs' 700 steps
    .venv/bin/python benchmarks/dare_table.py --steps 350 --dims 16  # shorter
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from datasets.synthetic import generate  # noqa: E402
from twin_synthetic import PARAMS, best_auc, train  # noqa: E402

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "DARE": ("dare", ["model.tables=2"]),
    "TWIN": ("dare", ["model.tables=1"]),
    "TWIN (hard)": ("dare", ["model.tables=1", "model.search=hard"]),
    "TWIN w/ proj": ("dare", ["model.tables=1", "model.projection=true"]),
    "TWIN w/o TR": ("dare", ["model.tables=1", "model.target_aware=false"]),
    "TWIN-4E": ("dare", ["model.tables=4"]),
    "DIN": ("din_last50", ["model.history_length=200"]),
}
SLUG = {name: name.lower().replace(" ", "_").replace("/", "").replace("(", "").replace(")", "") for name in VARIANTS}


def dim_overrides(config: str, dim: int) -> list[str]:
    return [f"model.embedding_dim={dim}"] if config.startswith("din") else [f"model.attn_dim={dim}", f"model.repr_dim={dim}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps (default: the configs' 700)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/synthetic_long")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/dare_table")
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        generate(args.data, PARAMS)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    for dim in args.dims:
        for row in args.rows:
            config, extra = VARIANTS[row]
            for seed in args.seeds:
                m = train(f"{SLUG[row]}_d{dim}", seed, args.data, args.out, args.steps, config=config,
                          extra=extra + dim_overrides(config, dim))
                results.setdefault(str(dim), {}).setdefault(row, []).append(m)
                (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    steps = args.steps or 700
    print(f"DARE Table 1 on synthetic_long ({len(args.seeds)} seeds {args.seeds}, {steps} steps of 2 x 128, 2 ranks; "
          "AUC: validation, best of 4 evaluations; GSU NDCG@100 vs hist_relevance: last evaluation)")
    for dim, rows in results.items():
        ref = statistics.mean(best_auc(r) for r in rows["DARE"]) if "DARE" in rows else None
        print(f"\nembedding dim {dim}")
        print("| model | AUC mean (sd) | AUC per seed | vs DARE | GSU NDCG@100 | samples/s |")
        print("|---|---|---|---|---|---|")
        for row, runs in sorted(rows.items(), key=lambda kv: -statistics.mean(best_auc(r) for r in kv[1])):
            aucs = [best_auc(r) for r in runs]
            sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
            delta = "" if ref is None or row == "DARE" else f"{statistics.mean(aucs) - ref:+.4f}"
            ndcg = [float(r["eval"].get("gsu_ndcg@100", float("nan"))) for r in runs]
            nd = "-" if all(x != x for x in ndcg) else f"{statistics.mean(ndcg):.3f}"
            print(f"| {row} | {statistics.mean(aucs):.4f} ({sd:.4f}) | {' / '.join(f'{a:.4f}' for a in aucs)} | {delta} "
                  f"| {nd} | {statistics.mean(float(r['samples_per_s']) for r in runs):,.0f} |")


if __name__ == "__main__":
    main()
