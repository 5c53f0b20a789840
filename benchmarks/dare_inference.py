"""DARE's inference acceleration (paper: half the attention dimension makes the search ~50% faster): GSU time per
request at L behaviours for d_att = d_repr, d_repr / 2 and d_repr / 4.

The DARE search of one request: look the behaviours' attention embeddings up (item id and category tables,
``d_att`` each), score them against the target's (``<e_i^att, v_t^att> / sqrt(A)``), keep the top 100
(``modules.sequence.jagged_topk``). The representation side (``d_repr``) is only read for the 100 survivors and
is not timed. One process, ``--threads`` threads, best of ``--repeats``.

    .venv/bin/python benchmarks/dare_inference.py [--lengths 10000] [--repr-dim 64]

The AUC cost of each d_att is measured by training (``configs/experiments/dare_synthetic_long.yaml`` with
``model.attn_dim=...``), not here.
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"DARE GSU time per request (item + category attention tables, top {TOP_K}, {args.threads} thread(s), "
          f"best of {args.repeats}); d_repr = {args.repr_dim}")
    print("| L | d_att | ms | vs d_att = d_repr |")
    print("|---|---|---|---|")
    for length in args.lengths:
        base = None
        for div in (1, 2, 4):
            d = args.repr_dim // div
            t = search_time(d, length, args.repeats)
            base = base or t
            print(f"| {length:,} | {d} (d_repr / {div}) | {t * 1e3:.3f} | {t / base:.2f}x time |")


if __name__ == "__main__":
    main()
