"""Parity with the authors' code on the public reference world (claim: the zoo trains as well as thuml/DARE).

What it does, from the repository root with ``../shared`` beside it:

1. writes the public Taobao-format world of ``../shared/REFERENCE_RUNS.md`` with ``../shared/tools/taobao_like.py``
   (its documented command, seed 1; 1,421,287 rows, 2.5 s) unless ``--work`` already holds it;
2. converts it with ``python -m datasets.taobao`` (DARE's protocol: 171,000 / 9,000 / 9,000 rows);
3. trains every zoo entry that has a protocol config ``configs/experiments/<model>_taobao_protocol.yaml``
   (one epoch, batch 2048, 4 validations, best checkpoint by validation AUC, test AUC of that checkpoint) for
   ``--seeds`` training seeds on 2 ranks, and once on 1 rank for the speed ratio;
4. prints our test AUC (mean and sd over seeds, and each seed) beside the official code's figures, read from
   ``../shared/REFERENCE_RUNS.md``, and our training samples/s at 1 and 2 ranks beside the official figure.

Protocol differences that remain (see README, Parity): the official code adds an auxiliary loss; it reports
test AUC on 8,192 of the 9,000 test rows (it drops the last partial batch), the zoo on all 9,000.
``samples/s`` is the trainer's own: global batch x steps / the slowest rank's time inside the training steps
(evaluation and checkpointing outside), comparable to REFERENCE_RUNS.md's "training time only"; the official
figure was measured on a quiet machine, ours in this run, so read the ratio as indicative.

    .venv/bin/python benchmarks/parity_taobao.py                 # 3 seeds, 2 ranks, plus 1 rank for speed
    .venv/bin/python benchmarks/parity_taobao.py --seeds 1 --models din
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WORLD_ARGS = [
    "--users", "3000", "--items", "300000", "--categories", "3000", "--interests-min", "10", "--interests-max", "20",
    "--session-mean", "2", "--explore", "0.3", "--item-zipf", "0.6", "--fav-prob", "0.05", "--dirichlet", "5",
    "--drift", "0.05", "--seed", "1",
]  # fmt: skip
# Each protocol config against its official line (twin_shared: the official code's own TWIN, a shared table).
OFFICIAL_NAMES = {"din": "DIN", "twin": "TWIN", "twin_shared": "TWIN", "dare": "DARE"}


def official_results(path: Path) -> dict[str, dict]:
    """Model -> {"seeds": [auc...], "samples_per_s": float} from REFERENCE_RUNS.md's Results table."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in OFFICIAL_NAMES.values() and re.match(r"0\.\d+", cells[1]):
            speed = float(cells[5].replace(",", "")) if re.match(r"[\d,]+$", cells[5]) else float("nan")
            out[cells[0]] = {"seeds": [float(c) for c in cells[1:4]], "samples_per_s": speed}
    return out


def run(cmd: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def prepare(work: Path, env: dict) -> Path:
    csv, data = work / "UserBehavior.csv", work / "taobao"
    work.mkdir(parents=True, exist_ok=True)
    if not csv.is_file():
        tool = SHARED / "tools" / "taobao_like.py"
        if not tool.is_file():
            raise SystemExit(f"the reference world's generator is expected at {tool} (../shared beside the repository)")
        run([sys.executable, str(tool), *WORLD_ARGS, "--out", str(csv)], env, "taobao_like.py")
    if not (data / "meta.json").is_file():
        run([sys.executable, "-m", "datasets.taobao", "--input", str(csv), "--out", str(data)], env, "datasets.taobao")
    return data


def train(model: str, ranks: int, seed: int, data: Path, run_dir: Path, env: dict) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "launch.train", "--config", f"configs/experiments/{model}_taobao_protocol.yaml",
        f"run_dir={run_dir}", f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/valid/*.parquet]",
        f"data.test_paths=[{data}/test/*.parquet]", f"data.meta_path={data}/meta.json", f"train.seed={seed}",
        f"data.batch_size={2048 // ranks}",  # the official global batch of 2048 on any number of ranks
        "train.progress_bar=false", "train.resume=false", "train.checkpoint_at_end=false",
    ]  # fmt: skip
    # Each rank gets the machine's cores divided by the ranks (the official single process used 2 threads).
    threads = max(1, (os.cpu_count() or 2) // ranks)
    proc = run(cmd, dict(env, OMP_NUM_THREADS=str(threads)), f"{model} x{ranks} seed {seed}")
    return json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/parity", help="where the world, its conversion and the runs go")
    ap.add_argument("--models", nargs="+", default=None, help="default: every configs/experiments/*_taobao_protocol.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 1..N on 2 ranks (default 3)")
    args = ap.parse_args(argv)
    models = args.models or sorted(
        p.name[: -len("_taobao_protocol.yaml")] for p in (ROOT / "configs/experiments").glob("*_taobao_protocol.yaml")
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    work = (ROOT / args.work).resolve()
    data = prepare(work, env)
    official = official_results(SHARED / "REFERENCE_RUNS.md")
    rows = []
    for model in models:
        aucs, speeds2 = [], []
        for seed in range(1, args.seeds + 1):
            t0 = time.perf_counter()
            m = train(model, 2, seed, data, work / f"{model}_x2_seed{seed}", env)
            aucs.append(m["test"]["auc"])
            speeds2.append(m["samples_per_s"])
            print(f"[parity] {model} x2 seed {seed}: test auc {m['test']['auc']:.4f} (best valid step "
                  f"{m['best']['step']}), {m['samples_per_s']:.0f} samples/s, {time.perf_counter() - t0:.0f} s wall",
                  file=sys.stderr)
        m1 = train(model, 1, 1, data, work / f"{model}_x1_seed1", env)
        print(f"[parity] {model} x1 seed 1: test auc {m1['test']['auc']:.4f}, {m1['samples_per_s']:.0f} samples/s",
              file=sys.stderr)
        ref = official.get(OFFICIAL_NAMES.get(model, model.upper()), {})
        rows.append({
            "model": model, "aucs": aucs, "auc_1rank": m1["test"]["auc"], "sps_2": statistics.median(speeds2),
            "sps_1": m1["samples_per_s"], "official_seeds": ref.get("seeds"), "official_sps": ref.get("samples_per_s"),
        })  # fmt: skip

    print(f"parity on the public reference world ({SHARED / 'REFERENCE_RUNS.md'}): test AUC after 1 epoch, best of 4"
          f" validations; ours: {args.seeds} seeds on 2 ranks")
    header = (f"{'model':<11} {'official AUC mean (sd)':>22} {'ours mean (sd)':>16} {'ours per seed':>24} "
              f"{'ours 1 rank':>11} {'official sps':>12} {'ours sps x1':>11} {'ours sps x2':>11} {'x2 / official':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        o = r["official_seeds"]
        o_txt = f"{statistics.mean(o):.4f} ({statistics.stdev(o):.4f})" if o else "n/a"
        sd = statistics.stdev(r["aucs"]) if len(r["aucs"]) > 1 else 0.0
        ratio = r["sps_2"] / r["official_sps"] if r["official_sps"] else float("nan")
        print(f"{r['model']:<11} {o_txt:>22} {statistics.mean(r['aucs']):>9.4f} ({sd:.4f}) "
              f"{' '.join(f'{a:.4f}' for a in r['aucs']):>24} {r['auc_1rank']:>11.4f} "
              f"{r['official_sps'] or float('nan'):>12.0f} {r['sps_1']:>11.0f} {r['sps_2']:>11.0f} {ratio:>13.2f}")
    return rows


if __name__ == "__main__":
    main()
