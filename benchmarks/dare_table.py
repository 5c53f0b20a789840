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

``attn_dim = repr_dim = dim`` (DIN: ``embedding_dim = dim``).

``--world taobao_sample`` runs the same table as a smoke result on the real Taobao sample
(``../shared/data/taobao_userbehavior_sample.csv``, 10,000 rows of 114 users), converted by
``datasets.taobao`` with ``--min-pv 40 --train-targets 7`` (the sample's histories are too short for DARE's
210 / 19: 76 users, 1,596 train / 228 validation / 228 test rows) into ``data/taobao_sample``, under the
official protocol configs (``{dare,din}_taobao_protocol.yaml``) at batch 2 x 32 for 3 epochs. It prints per dim the validation AUC of the best
checkpoint (mean, sd, per seed), the difference to DARE and the GSU's NDCG@100 against the planted relevance
(``hist_relevance``), and writes ``runs/dare_table/results.json``.

    .venv/bin/python benchmarks/dare_table.py                        # 7 rows x 2 dims x 3 seeds, the configs' 700 steps
    .venv/bin/python benchmarks/dare_table.py --steps 350 --dims 16  # shorter
    .venv/bin/python benchmarks/dare_table.py --time-mode embed      # every dare row with decoupled time tables
    .venv/bin/python benchmarks/dare_table.py --attn-temperature 2   # every dare row's attention logits halved
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

from benchmarks.runs import torchrun_train  # noqa: E402
from datasets.synthetic import generate  # noqa: E402
from twin_synthetic import PARAMS, best_auc, train  # noqa: E402

SAMPLE = ROOT.parent / "shared/data/taobao_userbehavior_sample.csv"
SAMPLE_CONVERT = ["--min-pv", "40", "--train-targets", "7", "--train-stride", "5"]

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


def taobao_sample_run(row: str, dim: int, seed: int, data: Path, out: Path) -> dict:
    """One row of the table on the converted Taobao sample (module docstring)."""
    config, extra = VARIANTS[row]
    config = "din" if config.startswith("din") else config
    extra = [] if config == "din" else extra  # DIN: the protocol's own (200 behaviours)
    overrides = [f"train.seed={seed}", f"data.seed={seed}", f"data.meta_path={data}/meta.json",
                 f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/valid/*.parquet]",
                 f"data.test_paths=[{data}/test/*.parquet]", "data.batch_size=32", "train.epochs=3",
                 "train.log_every=5", *extra, *dim_overrides(config, dim)]
    return torchrun_train(f"configs/experiments/{config}_taobao_protocol.yaml", out / f"{SLUG[row]}_d{dim}_seed{seed}",
                          overrides, f"{row} d{dim} seed {seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps (default: the configs' 700)")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs already finished")
    parser.add_argument("--attn-temperature", type=float, default=None,
                        help="model.attn_temperature of every dare-entry row (default: the configs' 1; synthetic_long"
                             " only; runs go to <out>_temp_<T>)")
    parser.add_argument("--time-mode", choices=["bias", "embed"], default=None,
                        help="model.time_mode of every dare-entry row (default: the configs'; synthetic_long only)")
    parser.add_argument("--world", choices=["synthetic_long", "taobao_sample"], default="synthetic_long")
    parser.add_argument("--data", type=Path, default=None, help="default: data/<world>")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/dare_table (runs/dare_table_taobao_sample)")
    args = parser.parse_args()
    sample = args.world == "taobao_sample"
    args.data = args.data or ROOT / f"data/{args.world}"
    default_out = "runs/dare_table_taobao_sample" if sample else "runs/dare_table"
    args.out = args.out or ROOT / (default_out + (f"_time_{args.time_mode}" if args.time_mode else "")
                                   + (f"_temp_{args.attn_temperature:g}" if args.attn_temperature else ""))
    if sample and not (args.data / "meta.json").is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "datasets.taobao", "--input", str(SAMPLE), "--out", str(args.data),
                        *SAMPLE_CONVERT], cwd=ROOT, check=True, capture_output=True)
    elif not sample and not (args.data / "meta.json").is_file():
        generate(args.data, PARAMS)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    for dim in args.dims:
        for row in args.rows:
            config, extra = VARIANTS[row]
            for seed in args.seeds:
                name = f"{SLUG[row]}_d{dim}_seed{seed}"  # the run folder of either world
                if args.report_only and not (args.out / name / "metrics.json").is_file():
                    continue
                if sample:
                    m = taobao_sample_run(row, dim, seed, args.data, args.out)
                else:
                    time_mode = [f"model.time_mode={args.time_mode}"] if args.time_mode and config == "dare" else []
                    if args.attn_temperature and config == "dare":
                        time_mode.append(f"model.attn_temperature={args.attn_temperature:g}")
                    m = train(f"{SLUG[row]}_d{dim}", seed, args.data, args.out, args.steps, config=config,
                              extra=extra + time_mode + dim_overrides(config, dim))
                results.setdefault(str(dim), {}).setdefault(row, []).append(m)
                (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if sample:
        print(f"DARE Table 1 on the real Taobao sample (smoke: 1,596 train rows; {len(args.seeds)} seeds {args.seeds}, "
              "3 epochs of 2 x 32, 2 ranks; AUC: validation, best of 4 evaluations per epoch)")
    else:
        steps = args.steps or 700
        print(f"DARE Table 1 on synthetic_long ({len(args.seeds)} seeds {args.seeds}, {steps} steps of 2 x 128, 2 ranks; "
              "AUC: validation, best of 4 evaluations; GSU NDCG@100 vs hist_relevance: last evaluation)")
    for dim, rows in results.items():
        done = {len(v) for v in rows.values()}
        if done != {len(args.seeds)}:
            print(f"\n(dim {dim}: seeds finished per row: { {k: len(v) for k, v in rows.items()} })")
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
