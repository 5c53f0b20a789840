"""Tiny request-level parquet data for the ``request_tiny`` test entry (configs/tests/request_tiny.yaml).

One row is one REQUEST: ``request_id`` (unique over both splits: the ranking metrics' group), ``user_id``, the
user's behaviour items ``hist_item_id`` (sequence group ``history``), the request's candidates
``cand_item_id`` and their clicks ``cand_click`` (sequence group ``candidates``, 3..12 per request, every
request with at least one click and one non-click); no per-request labels.

Planted signal: every user prefers one item parity (``user_id % 2``); 90% of the behaviours have that parity,
and a candidate is clicked exactly when its parity is the user's (flipped with probability ``noise``). Item
embeddings must learn the parity for the model to rank clicked candidates first, so the ranking metrics start
near chance and rise with training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class RequestDataParams:
    """Sizes of the tiny request-level data set (table sizes in the YAML are ``num_* + 1``; id 0 is padding).

    Attributes:
        num_train: training requests.
        num_eval: evaluation requests.
        num_users: user ids ``1..num_users``.
        num_items: item ids ``1..num_items`` (even count: both parities equally many).
        min_candidates: fewest candidates of a request (>= 2: one click and one non-click).
        max_candidates: most candidates of a request.
        max_history: longest history (the shortest is 3).
        noise: probability that a candidate's click is flipped.
        row_group_size: rows per parquet row group (row groups are split across ranks).
        seed: everything is a function of the parameters.
    """

    num_train: int = 2048
    num_eval: int = 512
    num_users: int = 100
    num_items: int = 200
    min_candidates: int = 3
    max_candidates: int = 12
    max_history: int = 15
    noise: float = 0.05
    row_group_size: int = 256
    seed: int = 0


def request_table(n: int, first_request_id: int, p: RequestDataParams, rng: np.random.Generator) -> pa.Table:
    """``n`` requests with ids ``first_request_id ..``, drawn as described in the module docstring."""
    half = p.num_items // 2
    users = rng.integers(1, p.num_users + 1, size=n)
    hist, cands, clicks = [], [], []
    for u in users:
        parity = int(u) % 2

        def items(k: int, want: np.ndarray) -> np.ndarray:
            # k ids in 1..num_items, element i of parity want[i] (odd ids 2j + 1, even ids 2j + 2)
            j = rng.integers(0, half, size=k)
            return np.where(want == 1, 2 * j + 1, 2 * j + 2)

        h = rng.integers(3, p.max_history + 1)
        h_par = np.where(rng.random(h) < 0.9, parity, 1 - parity)
        hist.append(items(h, h_par).tolist())
        m = int(rng.integers(p.min_candidates, p.max_candidates + 1))
        clicked = rng.random(m) < 0.4
        clicked[0], clicked[1] = True, False  # one click and one non-click at least
        clicked = rng.permutation(clicked)
        c_par = np.where(clicked, parity, 1 - parity)
        flip = rng.random(m) < p.noise
        cands.append(items(m, c_par).tolist())
        clicks.append(np.where(flip, ~clicked, clicked).astype(np.float32).tolist())
    return pa.table(
        {
            "request_id": pa.array(np.arange(first_request_id, first_request_id + n), pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "hist_item_id": pa.array(hist, pa.list_(pa.int64())),
            "cand_item_id": pa.array(cands, pa.list_(pa.int64())),
            "cand_click": pa.array(clicks, pa.list_(pa.float32())),
        }
    )


def write_request_data(out: Path, params: RequestDataParams = RequestDataParams()) -> dict[str, Path]:
    """Writes ``out/train/part-0.parquet`` and ``out/eval/part-0.parquet``; returns the two folders."""
    rng = np.random.default_rng(params.seed)
    dirs = {"train": out / "train", "eval": out / "eval"}
    sizes = {"train": params.num_train, "eval": params.num_eval}
    first = 0
    for split, folder in dirs.items():
        folder.mkdir(parents=True, exist_ok=True)
        table = request_table(sizes[split], first, params, rng)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=params.row_group_size)
        first += sizes[split]
    return dirs
