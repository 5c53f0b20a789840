"""DARE's inference acceleration (paper: half the attention dimension makes the search ~50% faster): GSU time per
request at L behaviours for d_att = d_repr, d_repr / 2 and d_repr / 4.

The DARE search of one request: look the behaviours' attention embeddings up (item id and category tables,
``d_att`` each), score them against the target's (``<e_i^att, v_t^att> / sqrt(A)``), keep the top 100
(``modules.sequence.jagged_topk``). The representation side (``d_repr``) is only read for the 100 survivors and
is not timed. One process, ``--threads`` threads, best of ``--repeats``.

    .venv/bin/python benchmarks/dare_inference.py [--lengths 10000] [--repr-dim 64]
    .venv/bin/python benchmarks/dare_inference.py --auc [--repr-dim 16] [--seeds 1 2 3] [--steps 350]

``--auc`` also measures the AUC cost of each d_att by training: DARE
(``configs/experiments/dare_synthetic_long.yaml``, ``model.repr_dim = d_repr``, ``model.attn_dim = d_att``) on
the synthetic long-sequence data of ``benchmarks/twin_synthetic.py`` (generated on first use), 2 ranks, the same
steps and seeds for every d_att; the table shows the validation AUC of the best of 4 evaluations (mean, sd, per
seed), its difference to d_att = d_repr, the GSU NDCG@100 against the planted relevance, and the GSU time ratio
at the first of ``--lengths``. Finished runs in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modules.sequence import jagged_topk  # noqa: E402

ITEMS, CATEGORIES, TOP_K = 1_000_000, 10_000, 100


def search_time(d_att: int, length: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    items, cats = torch.randn(ITEMS, d_att, generator=g), torch.randn(CATEGORIES, d_att, generator=g)
    ids = torch.randint(0, ITEMS, (length,), generator=g)
    cid = torch.randint(0, CATEGORIES, (length,), generator=g)
    target = torch.randn(2 * d_att, generator=g)
    lengths = torch.tensor([length])
    scale = 1.0 / (2 * d_att) ** 0.5

    def once() -> None:
        keys = torch.cat([items.index_select(0, ids), cats.index_select(0, cid)], dim=1)  # [L, A]
        jagged_topk((keys @ target) * scale, lengths, TOP_K)

    once()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[10_000])
    ap.add_argument("--repr-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--auc", action="store_true", help="also train DARE at each d_att (the AUC cost)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=350, help="train.max_steps of every --auc run")
    ap.add_argument("--data", type=Path, default=ROOT / "data/synthetic_long")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/dare_datt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"DARE GSU time per request (item + category attention tables, top {TOP_K}, {args.threads} thread(s), "
          f"best of {args.repeats}); d_repr = {args.repr_dim}")
    print("| L | d_att | ms | vs d_att = d_repr |")
    print("|---|---|---|---|")
    ratios: dict[int, float] = {}
    for length in args.lengths:
        base = None
        for div in (1, 2, 4):
            d = args.repr_dim // div
            t = search_time(d, length, args.repeats)
            base = base or t
            ratios.setdefault(div, t / base)
            print(f"| {length:,} | {d} (d_repr / {div}) | {t * 1e3:.3f} | {t / base:.2f}x time |")
    if args.auc:
        auc_table(args, ratios)


def auc_table(args: argparse.Namespace, ratios: dict[int, float]) -> None:
    """Trains DARE at d_att = d_repr / 1, 2, 4 (every seed) and prints the AUC cost beside the GSU time."""
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from twin_synthetic import PARAMS, best_auc, train

    from datasets.synthetic import generate

    if not (args.data / "meta.json").is_file():
        generate(args.data, PARAMS)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for div in (1, 2, 4):
        d = args.repr_dim // div
        runs = [train(f"dare_r{args.repr_dim}_a{d}", seed, args.data, args.out, args.steps, config="dare",
                      extra=["model.tables=2", f"model.repr_dim={args.repr_dim}", f"model.attn_dim={d}"])
                for seed in args.seeds]
        rows.append((div, d, [best_auc(r) for r in runs],
                     [float(r["eval"].get("gsu_ndcg@100", float("nan"))) for r in runs]))
    base = statistics.mean(rows[0][2])
    print(f"\nDARE AUC cost of d_att on synthetic_long (d_repr = {args.repr_dim}, {args.steps} steps of 2 x 128, "
          f"seeds {args.seeds}; validation AUC, best of 4 evaluations; GSU time at L = {args.lengths[0]:,})")
    print("| d_att | AUC mean (sd) | per seed | vs d_att = d_repr | GSU NDCG@100 | GSU time |")
    print("|---|---|---|---|---|---|")
    for div, d, aucs, ndcg in rows:
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        print(f"| {d} (d_repr / {div}) | {statistics.mean(aucs):.4f} ({sd:.4f}) | {' / '.join(f'{a:.4f}' for a in aucs)}"
              f" | {statistics.mean(aucs) - base:+.4f} | {statistics.mean(ndcg):.3f} | {ratios[div]:.2f}x |")


if __name__ == "__main__":
    main()
