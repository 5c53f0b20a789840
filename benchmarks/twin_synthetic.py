"""The two-stage comparison on synthetic data with planted long-range structure (claim: TWIN beats DIN over the
last 50 behaviours by >= 0.01 AUC and beats SIM-hard and SIM-soft; its GSU retrieves the truly relevant
behaviours better than theirs).

What it does, from the repository root:

1. writes ``data/synthetic_long`` (``configs/datasets/synthetic_long.yaml``'s parameters: 60,000 train / 10,000
   eval rows, histories up to 2,000 behaviours, median 800) unless it is there;
2. trains ``configs/experiments/{twin,sim_hard,sim_soft,din_last50}_synthetic_long.yaml`` for ``--seeds`` seeds
   (``train.seed`` = ``data.seed`` = the seed; same data, same steps) on 2 ranks;
   ``twin_oracle`` is a diagnostic row: TWIN with ``model.search=oracle``, its ESU over the 100 behaviours of
   highest true relevance (it reads ``hist_relevance``), the most any GSU could hand the ESU;
3. prints validation AUC of the best checkpoint (mean, sd, each seed), GAUC, logloss, the GSU's NDCG@100 and
   recall@100 against the data's true per-behaviour relevance (``hist_relevance``; rows longer than 100), and
   the training samples/s, with each entry's AUC difference to TWIN; writes ``runs/twin_synthetic/results.json``.

    .venv/bin/python benchmarks/twin_synthetic.py                  # 6 rows x 3 seeds, about 70 min here
    .venv/bin/python benchmarks/twin_synthetic.py --seeds 1 --models twin din_last50 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import torchrun_train  # noqa: E402
from datasets.synthetic import SyntheticParams, generate  # noqa: E402

PARAMS = SyntheticParams(
    num_samples=60000, num_eval_samples=10000, num_users=3000, num_items=20000, num_categories=200,
    max_seq_len=2000, length_median=800, row_group_size=2000, files=4, seed=0,
)  # fmt: skip
MODELS = ["twin", "dare", "sim_hard", "sim_soft", "din_last50", "twin_oracle"]
# Rows that are another row's config with overrides. twin_oracle is a diagnostic, not a model: TWIN's ESU over the
# 100 behaviours of highest true relevance (model.search=oracle reads hist_relevance), the most any GSU can hand it.
VARIANTS = {"twin_oracle": ("twin", ["model.search=oracle"])}


def train(model: str, seed: int, data: Path, out: Path, steps: int | None, config: str | None = None,
          extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Trains ``configs/experiments/<config or model>_synthetic_long.yaml`` with ``extra`` overrides into
    ``out/<model>_seed<seed>`` on 2 ranks (a finished run's metrics are reused) and returns its metrics."""
    run_dir = out / f"{model}_seed{seed}"
    overrides = [
        f"train.seed={seed}", f"data.seed={seed}",
        f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]",
    ]  # fmt: skip
    if steps is not None:
        overrides += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 4)}"]
    overrides += list(extra)
    return torchrun_train(f"configs/experiments/{config or model}_synthetic_long.yaml", run_dir, overrides,
                          f"{model} seed {seed}")


def best_auc(m: dict) -> float:
    """Validation AUC of the best checkpoint (the best of the run's evaluations)."""
    return float(m["best"]["value"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps (default: the configs')")
    parser.add_argument("--data", type=Path, default=ROOT / "data/synthetic_long")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/twin_synthetic")
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        generate(args.data, PARAMS)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for model in args.models:
        for seed in args.seeds:
            config, extra = VARIANTS.get(model, (None, []))
            results.setdefault(model, []).append(train(model, seed, args.data, args.out, args.steps, config, extra))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    def stat(runs: list[dict], key: str) -> list[float]:
        return [float(r["eval"].get(key, float("nan"))) for r in runs]

    ref = statistics.mean(best_auc(r) for r in results["twin"]) if "twin" in results else None
    print(f"two-stage comparison on synthetic_long ({len(args.seeds)} seeds {args.seeds}, 2 ranks; "
          "AUC: validation, best of 4 evaluations; GAUC, logloss, GSU NDCG/recall@100 vs hist_relevance: last evaluation)")
    print("| model | AUC mean (sd) | AUC per seed | vs TWIN | GAUC | logloss | GSU NDCG@100 | GSU recall@100 | samples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, runs in results.items():
        aucs = [best_auc(r) for r in runs]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        delta = "" if ref is None or model == "twin" else f"{statistics.mean(aucs) - ref:+.4f}"
        ndcg, recall = stat(runs, "gsu_ndcg@100"), stat(runs, "gsu_recall@100")
        fmt = lambda xs: "-" if all(x != x for x in xs) else f"{statistics.mean(xs):.3f}"  # noqa: E731
        print(f"| {model} | {statistics.mean(aucs):.4f} ({sd:.4f}) | {' / '.join(f'{a:.4f}' for a in aucs)} | {delta} "
              f"| {statistics.mean(float(r['gauc']) for r in runs):.4f} | {statistics.mean(float(r['logloss']) for r in runs):.4f} "
              f"| {fmt(ndcg)} | {fmt(recall)} | {statistics.mean(float(r['samples_per_s']) for r in runs):,.0f} |")


if __name__ == "__main__":
    main()
