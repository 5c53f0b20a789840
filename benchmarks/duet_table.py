"""DUET's comparison on synthetic request-level data with planted set effects and selection bias (claim, from
the paper: DUET > w/o KL > w/o set > w/o co > the baselines).

One command trains DUET, its three ablations and the pre-ranking baselines on the same data
(``data/synthetic_requests``, ``python -m datasets.synthetic_requests``'s defaults, written unless it is there:
20,000 train / 3,000 validation / 3,000 test requests of 200 candidates, about 20 exposed), same protocol
(``configs/experiments/common/requests_train.yaml``: one epoch, 2 ranks x 64 requests, the best of 4
validations by exposed AUC), for ``--seeds`` seeds, and prints the test metrics of the best checkpoint:

| row | config, overrides |
|---|---|
| DUET | ``duet_synthetic_requests.yaml`` (co-training, KL 0.1, set attention) |
| DUET w/o KL | ``model.kl_weight=0`` |
| DUET w/o set | ``model.set_attention=false`` (no candidate-to-candidate attention) |
| DUET w/o co | ``model.training=exposed`` (one model, exposed candidates only) |
| two-tower | ``two_tower_synthetic_requests.yaml`` (exposed only) |
| three-tower | ``three_tower_synthetic_requests.yaml`` (exposed only) |
| two-tower + IPS | ``model.training=ips`` (the logged propensities) |
| two-tower + DR-JL | ``model.training=dr_jl`` |
| two-tower + UKD | ``model.training=ukd`` (single-model pseudo labels: teacher on exposed, student on all) |

Columns: AUC and per-user AUC on the exposed test candidates (the observed clicks), the entire-space AUC on
every candidate against its true click (known in synthetic data), Recall@100 / NDCG@100 per request against
the true clicks, NDCG@100 against the observed clicks over all candidates (RecFlow's pre-ranking protocol:
unexposed = not clicked), and training requests/s. Writes ``runs/duet_table/results.json``.

    .venv/bin/python benchmarks/duet_table.py                   # 9 rows x 3 seeds
    .venv/bin/python benchmarks/duet_table.py --seeds 1 --rows DUET two-tower
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import torchrun_train  # noqa: E402

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "DUET": ("duet", []),
    "DUET w/o KL": ("duet", ["model.kl_weight=0"]),
    "DUET w/o set": ("duet", ["model.set_attention=false"]),
    "DUET w/o co": ("duet", ["model.training=exposed"]),
    "two-tower": ("two_tower", []),
    "three-tower": ("three_tower", []),
    "two-tower + IPS": ("two_tower", ["model.training=ips"]),
    "two-tower + DR-JL": ("two_tower", ["model.training=dr_jl"]),
    "two-tower + UKD": ("two_tower", ["model.training=ukd"]),
}
COLUMNS = [  # (header, test metric key)
    ("AUC (exposed)", "auc/cand_click"),
    ("UAUC (exposed)", "uauc/cand_click"),
    ("entire-space AUC", "auc/cand_true_click"),
    ("Recall@100 (true)", "recall@100/cand_true_click"),
    ("NDCG@100 (true)", "ndcg@100/cand_true_click"),
    ("NDCG@100 (observed, all)", "ndcg@100/cand_click@all"),
]


def slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", type=Path, default=ROOT / "data/synthetic_requests")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/duet_table")
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "datasets.synthetic_requests", "--out", str(args.data)], cwd=ROOT,
                       check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = [f"data.meta_path={args.data}/meta.json", f"data.train_paths=[{args.data}/train/*.parquet]",
            f"data.eval_paths=[{args.data}/valid/*.parquet]", f"data.test_paths=[{args.data}/test/*.parquet]"]
    results: dict[str, list[dict]] = {}
    for row in args.rows:
        config, extra = VARIANTS[row]
        for seed in args.seeds:
            m = torchrun_train(f"configs/experiments/{config}_synthetic_requests.yaml",
                               args.out / f"{slug(row)}_seed{seed}",
                               [f"train.seed={seed}", f"data.seed={seed}", *data, *extra], f"{row} seed {seed}")
            results.setdefault(row, []).append(m)
            (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"pre-ranking on synthetic_requests ({len(args.seeds)} seeds {args.seeds}, 2 ranks; test split, best"
          " checkpoint by validation AUC on exposed candidates; mean (sd))")
    print("| model | " + " | ".join(h for h, _ in COLUMNS) + " | requests/s |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for row, runs in results.items():
        cells = []
        for _, key in COLUMNS:
            xs = [float(r["test"][key]) for r in runs]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.4f} ({sd:.4f})")
        rps = statistics.mean(float(r["samples_per_s"]) for r in runs)
        print(f"| {row} | " + " | ".join(cells) + f" | {rps:,.0f} |")


if __name__ == "__main__":
    main()
