"""``mapping: mch`` vs ``mapping: hash`` when the id vocabulary is larger than the table (claim: on a skewed
stream the ZCH gives the hot ids rows of their own, so far more of the traffic reads an unshared row than
with a hash of the same size), and what the ZCH update costs per training step.

A stream of ``--steps`` batches of ``--batch`` lookups, ids drawn Zipf(``--alpha``) over ``--vocab`` distinct
raw 64-bit ids (random int64 values), into a table of ``--rows`` rows:

* hash: ``row = splitmix64(id) mod rows`` (the reader's ``mapping: hash``); a lookup reads an *own* row when
  no other id of the stream hashes to it;
* mch: torchrec's ``MCHManagedCollisionModule`` as ``mapping: mch`` builds it (``eviction_interval`` 1, the
  policy of ``--policy``), trained on the stream; a lookup reads an own row when its id holds a row (every
  other id shares the miss row).

A lookup is *stable* when it reads an own row and the same row as the id's previous lookup: then the row was
trained by this id alone since (hash rows never move but are shared; ZCH rows are exclusive but an evicted id
that comes back gets another row, whose weights an evicted id trained: the unsharded module does not reset
them, torchrec's sharded one re-initialises them). Printed over the last quarter of the stream: the share of
lookups on an own row, the share that are stable, the share of the 100 hottest ids holding an own row at the
end, and the mean ZCH step time (one process, ``--threads`` threads).

    .venv/bin/python benchmarks/mch_collisions.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchrec.sparse.jagged_tensor import JaggedTensor  # noqa: E402

from datasets.schema import MchConfig, MchEvictionPolicy, hash_ids  # noqa: E402
from modules.managed_collision import build_mch_module  # noqa: E402


def stream(vocab: int, alpha: float, steps: int, batch: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The vocabulary's raw ids (hottest first) and ``steps`` batches of raw ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(2**63), 2**63 - 1, vocab, dtype=np.int64)
    p = 1.0 / np.arange(1, vocab + 1) ** alpha
    p /= p.sum()
    return ids, [ids[rng.choice(vocab, batch, p=p)] for _ in range(steps)]


def run(args: argparse.Namespace) -> list[dict]:
    vocab_ids, batches = stream(args.vocab, args.alpha, args.steps, args.batch, args.seed)
    hot = vocab_ids[:100]
    tail = batches[-max(1, args.steps // 4):]
    out = []

    # hash: exclusive rows are those only one id seen so far maps to
    owners: dict[int, set[int]] = {}
    for b in batches:
        for i, r in zip(b.tolist(), hash_ids(b, args.rows).tolist()):
            owners.setdefault(r, set()).add(i)
    shared = {r for r, s in owners.items() if len(s) > 1}
    tail_rows = np.concatenate([hash_ids(b, args.rows) for b in tail])
    own = float(np.mean([r not in shared for r in tail_rows.tolist()]))
    out.append({"mapping": "hash", "exclusive": own, "stable": own,
                "hot_exclusive": float(np.mean([r not in shared for r in hash_ids(hot, args.rows).tolist()])),
                "step_ms": float("nan")})

    for policy in args.policy:
        mch = MchConfig(eviction_policy=MchEvictionPolicy(policy))
        zch = build_mch_module("t", args.rows, mch, torch.device("cpu"))
        zch.train()

        def remap(ids: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(ids)
            return zch({"t": JaggedTensor(values=t, lengths=torch.tensor([t.numel()]))})["t"].values()

        times, own, stable = [], [], []
        last: dict[int, int] = {}
        for k, b in enumerate(batches):
            start = time.perf_counter()
            rows = remap(b)
            times.append(time.perf_counter() - start)
            is_own = (rows != args.rows - 1).tolist()
            kept = []
            for i, r, o in zip(b.tolist(), rows.tolist(), is_own):
                kept.append(o and last.get(i, r) == r)
                last[i] = r if o else -1
            if k >= len(batches) - len(tail):
                own.append(float(np.mean(is_own)))
                stable.append(float(np.mean(kept)))
        zch.eval()
        out.append({"mapping": f"mch ({policy})", "exclusive": float(np.mean(own)), "stable": float(np.mean(stable)),
                    "hot_exclusive": float((remap(hot) != args.rows - 1).float().mean()),
                    "step_ms": 1e3 * float(np.mean(times[len(times) // 4:]))})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=200_000)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--policy", nargs="+", default=["distance_lfu", "lfu"], choices=[e.value for e in MchEvictionPolicy])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(f"vocab {args.vocab} ids, table {args.rows} rows, Zipf {args.alpha}, {args.steps} steps x {args.batch}"
          f" lookups; last {max(1, args.steps // 4)} steps")
    print(f"{'mapping':<20} {'lookups on own row':>19} {'stable lookups':>15} {'top-100 ids own row':>20}"
          f" {'ZCH step ms':>12}")
    for r in rows:
        print(f"{r['mapping']:<20} {r['exclusive']:>19.3f} {r['stable']:>15.3f} {r['hot_exclusive']:>20.3f}"
              f" {r['step_ms']:>12.2f}")


if __name__ == "__main__":
    main()
