"""TWIN's GSU cost (claim: with the projection cache the GSU is a lookup and a dot product per behaviour, at
L = 10^4 at least 20x faster than projecting every behaviour; TWIN reports a 99.3% cut of this bottleneck),
and end-to-end TWIN training at long histories.

Part 1, GSU time per request (``modules.search.GeneralSearchUnit``, one process, ``--threads`` threads), for
L = 10^3, 10^4, 10^5 behaviours per request, ``--requests`` requests per call, item-inherent features as in
TWIN section 3.2.1 (item id and author id 64 wide, category 8 wide), 4 heads of 16:

* naive: look the inherent embeddings of every behaviour up, concatenate, project by W_h, score, top-100;
* distinct: the same, projecting each distinct item of the call once (the training path);
* folded: the same lookups, W_h folded into the query (a dot product with the inherent features, no projection);
* cached: look the cached projection (``H * d_k`` = 64 wide, one row per item) up, score, top-100.

Every score includes a cross term (4 floats per behaviour, ``beta`` drawn at random as a trained model's: at
initialisation ``beta = 0``); the paths are timed in turn in every round (best of ``--repeats``), and "same
top-K" compares the naive and the cached path's indices. ``--breakdown L`` also runs the naive and the cached
path step by step at that L (lookup or gather, projection, key score, cross bias, top-K; each step on the
previous one's output) against the whole call, to show where the time goes.

Part 2 (``--train``): ``launch.train`` of ``configs/tests/twin_tiny.yaml``'s model at embedding dim 16 on 2
gloo ranks over synthetic data whose histories are all L = 10^3 and 10^4 long: training samples/s and peak
resident memory per rank (``metrics.json``).

    .venv/bin/python benchmarks/gsu_cache.py            # part 1
    .venv/bin/python benchmarks/gsu_cache.py --requests 1 --lengths 10000 --breakdown 10000  # and its steps
    .venv/bin/python benchmarks/gsu_cache.py --train    # parts 1 and 2 (about 5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modules.search import GeneralSearchUnit, TwinRelevance, _rank_dot, unique_items  # noqa: E402
from modules.sequence import jagged_topk  # noqa: E402

ITEMS, ATTRIBUTE_ROWS = 1_000_000, 100_000
DIMS = (64, 64, 8)  # item id, author id, category (TWIN 3.2.1: id features 64 wide, the others 8)
HEADS, HEAD_DIM, TOP_K = 4, 16, 100


def _time_all(fns: dict, repeats: int) -> dict:
    """Best time (s) of each function over ``repeats`` rounds; every round calls each function once, in turn,
    so that a load change on a shared machine touches all of them alike (the ratios within a run hold)."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


class Setup:
    """Item tables, a relevance with a random cross term and the projection cache of every item.

    ``dims``: widths of the inherent features, the first the item id's (ITEMS rows), each other an attribute of
    the item (ATTRIBUTE_ROWS rows, the item's value drawn at random).
    """

    def __init__(self, dims: tuple[int, ...], heads: int, head_dim: int) -> None:
        self.g = g = torch.Generator().manual_seed(0)
        self.tables = [torch.randn(ITEMS if j == 0 else ATTRIBUTE_ROWS, d, generator=g) for j, d in enumerate(dims)]
        self.attribute = [torch.randint(0, ATTRIBUTE_ROWS, (ITEMS,), generator=g) for _ in dims[1:]]  # item -> value
        self.inherent_dim = sum(dims)
        self.rel = TwinRelevance(self.inherent_dim, self.inherent_dim, cross_dims=[4], num_heads=heads,
                                 head_dim=head_dim)
        with torch.no_grad():
            self.rel.beta.normal_(generator=g)  # a trained model's cross term (beta starts at 0)
            self.cache = torch.cat([self.rel.keys(self.features(i)).reshape(len(i), -1)
                                    for i in torch.arange(ITEMS).split(200_000)])  # [ITEMS, H d_k]
        self.gsu = GeneralSearchUnit(self.rel, TOP_K)

    def features(self, i: torch.Tensor) -> torch.Tensor:
        """``[N, I_h]`` the inherent features of items ``i [N]`` (looked up and concatenated)."""
        return torch.cat([self.tables[0].index_select(0, i)]
                         + [t.index_select(0, a[i]) for t, a in zip(self.tables[1:], self.attribute)], -1)

    def requests(self, length: int, requests: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lengths [B], ids [S], cross [S, 4], query [B, H, d_k])`` for B requests of ``length`` behaviours."""
        lens = torch.full((requests,), length)
        # Zipf-like popularity: behaviours repeat popular items, as real histories do.
        ranks = torch.distributions.Pareto(torch.tensor(1.0), torch.tensor(1.2)).sample((requests * length,))
        ids = (ranks.long() - 1).clamp(max=ITEMS - 1)  # [S]
        cross = torch.randn(requests * length, 4, generator=self.g)
        with torch.no_grad():
            query = self.rel.query(torch.randn(requests, self.inherent_dim, generator=self.g))
        return lens, ids, cross, query


def gsu_table(lengths: list[int], requests: int, repeats: int, dims: tuple[int, ...] = DIMS,
              heads: int = HEADS, head_dim: int = HEAD_DIM) -> list[dict]:
    """Per L: the four paths' time per request, whether naive and cached chose the same top-K, distinct share."""
    setup = Setup(dims, heads, head_dim)
    gsu, cache, features = setup.gsu, setup.cache, setup.features
    rows = []
    for length in lengths:
        lens, ids, cross, query = setup.requests(length, requests)

        def inherent() -> torch.Tensor:
            return features(ids)

        def naive() -> None:
            gsu(query, lens, cross=cross, inherent=inherent())

        def distinct() -> None:
            gsu(query, lens, cross=cross, inherent=inherent(), items=unique_items(ids))

        def folded() -> None:
            gsu(query, lens, cross=cross, inherent=inherent(), fold=True)

        def cached() -> None:
            gsu(query, lens, cross=cross, cached_keys=cache.index_select(0, ids))

        with torch.no_grad():
            a = gsu(query, lens, cross=cross, inherent=inherent())
            b = gsu(query, lens, cross=cross, cached_keys=cache[ids])
            same = bool(torch.equal(a.indices, b.indices))
            t = {name: v / requests for name, v in _time_all(
                {"naive": naive, "distinct": distinct, "folded": folded, "cached": cached}, repeats).items()}
        rows.append({"L": length, **{f"{k}_ms": v * 1e3 for k, v in t.items()}, "same_topk": same,
                     "distinct_items_share": float(len(torch.unique(ids)) / len(ids))})
    return rows


def _time_steps(steps: list, whole, repeats: int) -> dict:
    """Best time (s) of each step of a path run in order, each on the previous steps' outputs, as inside the
    call (the data a step reads is as warm as there), and of the whole call right after, per round."""
    best: dict = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        state: dict = {}
        times = {}
        for name, key, fn in steps:
            t = time.perf_counter()
            state[key] = fn(state)
            times[name] = time.perf_counter() - t
        t = time.perf_counter()
        whole()
        times["whole call"] = time.perf_counter() - t
        if round_:
            best = {k: min(v, best.get(k, float("inf"))) for k, v in times.items()}
    return best


def breakdown(length: int, requests: int, repeats: int, dims: tuple[int, ...] = DIMS, heads: int = HEADS,
              head_dim: int = HEAD_DIM) -> list[tuple[str, float, float]]:
    """The naive and the cached path at one L split into their steps, run in order on each other's outputs
    (best of ``repeats`` rounds per step), ms per request: ``(step, naive_ms, cached_ms)`` rows, NaN where a
    path has no such step; "overhead" is the whole call minus its steps (argument handling, reshapes, the
    no-grad context), and the last row one ``torch.topk`` of the scores for reference."""
    setup = Setup(dims, heads, head_dim)
    gsu, cache, rel = setup.gsu, setup.cache, setup.rel
    lens, ids, cross, query = setup.requests(length, requests)
    q = query.reshape(requests, -1)  # [B, H d_k]
    scoring = [
        ("key score <k, q> / H", "score", lambda st: _rank_dot(st["keys"], q, lens) / heads),
        ("cross bias mean_h (K_c W_c) beta_h", "bias", lambda st: rel.cross_bias(cross).mean(dim=-1)),
        ("score + bias", "total", lambda st: st["score"] + st["bias"]),
        ("top-K (jagged_topk)", "top", lambda st: jagged_topk(st["total"], lens, TOP_K)),
    ]
    naive = [("inherent lookup (concatenated)", "inherent", lambda st: setup.features(ids)),
             ("projection K_h W_h", "keys", lambda st: rel.keys(st["inherent"]).reshape(len(ids), -1)), *scoring]
    cached = [("cache gather (L rows of H d_k)", "keys", lambda st: cache.index_select(0, ids)), *scoring]
    with torch.no_grad():
        t_naive = _time_steps(naive, lambda: gsu(query, lens, cross=cross, inherent=setup.features(ids)), repeats)
        t_cached = _time_steps(cached, lambda: gsu(query, lens, cross=cross, cached_keys=cache.index_select(0, ids)),
                               repeats)
        score = gsu(query, lens, cross=cross, cached_keys=cache.index_select(0, ids)).scores.view(requests, length)
        floor = _time_all({"topk": lambda: torch.topk(score, TOP_K, dim=1)}, repeats)["topk"]
    nan, ms = float("nan"), 1e3 / requests
    names = list(dict.fromkeys([name for name, _, _ in naive + cached]))
    rows = [(n, t_naive.get(n, nan) * ms, t_cached.get(n, nan) * ms) for n in names]
    rows.append(("overhead (call - steps)", (t_naive["whole call"] - sum(t_naive[n] for n, _, _ in naive)) * ms,
                 (t_cached["whole call"] - sum(t_cached[n] for n, _, _ in cached)) * ms))
    rows.append(("whole call", t_naive["whole call"] * ms, t_cached["whole call"] * ms))
    rows.append(("(reference: one torch.topk of the scores)", nan, floor * ms))
    return rows


def train_table(lengths: list[int], out: Path) -> list[dict]:
    from datasets.synthetic import SyntheticParams, generate

    rows = []
    for length in lengths:
        data = out / f"data_L{length}"
        samples = max(2048, 2_000_000 // length)
        if not (data / "meta.json").is_file():
            generate(data, SyntheticParams(
                num_samples=samples, num_eval_samples=256, num_users=200, num_items=1000, num_categories=50,
                max_seq_len=length, length_median=length * 4, length_sigma=0.01, row_group_size=128, files=2,
                seed=0))  # fmt: skip
        run_dir = out / f"run_L{length}"
        steps = max(8, samples // 64)  # one epoch of 2 ranks x 32
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "launch.train", "--config", "configs/tests/twin_tiny.yaml", f"run_dir={run_dir}",
               f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]",
               f"data.max_sequence_length={length}", "data.batch_size=32", "model.embedding_dim=16",
               "model.top_k=100", "model.head_dim=16", "model.short_history=50", f"train.max_steps={steps}",
               "train.checkpoint_every=0", "train.eval_every=0", "train.resume=false"]  # fmt: skip
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"L={length} failed:\n{proc.stderr[-3000:]}")
        m = json.loads((run_dir / "metrics.json").read_text())
        rows.append({"L": length, "samples_per_s": m["samples_per_s"], "behaviours_per_s": m["samples_per_s"] * length,
                     "peak_rss_mib_per_rank": m["peak_rss_mib_per_rank"], "steps": m["steps"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS),
                        help="inherent feature widths, item id first (default: TWIN 3.2.1's 64 64 8)")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--breakdown", type=int, metavar="L", default=0,
                        help="also time the steps of the naive and the cached path at this L (e.g. 10000)")
    parser.add_argument("--train", action="store_true", help="also the end-to-end training part")
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/gsu_cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = gsu_table(args.lengths, args.requests, args.repeats, tuple(args.dims), args.heads, args.head_dim)
    print(f"GSU time per request ({args.requests} requests per call, best of {args.repeats}, {args.threads} thread(s); "
          f"inherent {'+'.join(map(str, args.dims))} wide, {args.heads} heads x {args.head_dim}, top {TOP_K})")
    print("| L | naive ms | distinct-item ms | folded ms | cached ms | naive / cached | naive / folded | naive / distinct "
          "| distinct items / L | same top-K |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']:,} | {r['naive_ms']:.3f} | {r['distinct_ms']:.3f} | {r['folded_ms']:.3f} | {r['cached_ms']:.3f} "
              f"| {r['naive_ms'] / r['cached_ms']:.1f}x | {r['naive_ms'] / r['folded_ms']:.1f}x "
              f"| {r['naive_ms'] / r['distinct_ms']:.1f}x "
              f"| {r['distinct_items_share']:.2f} | {r['same_topk']} |")
    if args.breakdown:
        print(f"\nSteps at L = {args.breakdown:,} (ms per request, steps in order, best of {args.repeats} per step)")
        print("| step | naive ms | cached ms |")
        print("|---|---|---|")
        for name, naive_ms, cached_ms in breakdown(args.breakdown, args.requests, args.repeats, tuple(args.dims),
                                                   args.heads, args.head_dim):
            cells = [f"{x:.3f}" if x == x else "-" for x in (naive_ms, cached_ms)]
            print(f"| {name} | {cells[0]} | {cells[1]} |")
    if args.train:
        args.out.mkdir(parents=True, exist_ok=True)
        trows = train_table(args.train_lengths, args.out)
        print("\nTWIN training on 2 gloo ranks (batch 32 per rank, histories all L long)")
        print("| L | samples/s | behaviours/s | peak RSS per rank (MiB) |")
        print("|---|---|---|---|")
        for r in trows:
            print(f"| {r['L']:,} | {r['samples_per_s']:,.0f} | {r['behaviours_per_s']:,.0f} "
                  f"| {' / '.join(f'{x:,.0f}' for x in r['peak_rss_mib_per_rank'])} |")


if __name__ == "__main__":
    main()
