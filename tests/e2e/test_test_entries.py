"""Tiny end-to-end runs of the test-only entries (tests/entries, registered through the configs' ``imports:``).

* ``request_tiny`` (request-level data, ``ranking`` metrics, ``labels: []``) trains and evaluates on 2 ranks:
  request AUC, Recall@K and NDCG@K for the configured K, every evaluation request counted once (padding
  candidates masked out, request ids unique across ranks), and the planted signal learnt.
* ``cotrain_tiny`` (two sub-models with a table each per feature) plans both tables of every feature, logs
  its loss parts to TensorBoard, and a run stopped at step 10 and resumed ends with the metrics of a run
  that never stopped.

Per-table optimizer settings of the cotrain model in the fused optimizer: tests/entries/test_cotrain_optim.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets.synthetic import SyntheticParams, generate
from tests.entries.request_data import RequestDataParams, write_request_data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

REQUEST_CONFIG = "configs/tests/request_tiny.yaml"
COTRAIN_CONFIG = "configs/tests/cotrain_tiny.yaml"
# 500 evaluation requests on 2 ranks x 32: the last batches carry padding requests (masked out).
REQUEST_PARAMS = RequestDataParams(num_train=2048, num_eval=500)


@pytest.fixture(scope="module")
def request_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("request_tiny")
    write_request_data(out, REQUEST_PARAMS)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_tiny")
    # Parameters matching configs/datasets/synthetic_tiny.yaml (table sizes = ranges + 1), as in test_tiny_runs.py.
    generate(
        out,
        SyntheticParams(
            num_samples=4096, num_eval_samples=1024, num_users=200, num_items=1000, num_categories=50,
            max_seq_len=100, files=2, row_group_size=512, seed=0,
        ),
    )
    return out


def _data_overrides(data: Path) -> list[str]:
    return [f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]"]


def _torchrun(config: str, run_dir: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.train", "--config", config, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    m = json.loads(last)
    assert m == json.loads((run_dir / "metrics.json").read_text())
    return m


def _scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------------- request_tiny


def test_request_level_entry_trains_and_reports_ranking_metrics(request_data, tmp_path):
    run_dir = tmp_path / "request"
    m = _torchrun(REQUEST_CONFIG, run_dir, _data_overrides(request_data))
    assert m["model"] == "request_tiny" and m["world_size"] == 2 and m["steps"] == 30
    assert "auc" not in m and "gauc" not in m  # labels: [] -> no CTR metrics, and none needed
    ev = m["eval"]
    eval_file = pq.read_table(next((request_data / "eval").glob("*.parquet")))
    candidates = sum(len(c) for c in eval_file.column("cand_item_id").to_pylist())
    # Every evaluation request counted once (ids unique across ranks, padding requests masked out).
    assert ev["requests"] == ev["requests/cand_click"] == REQUEST_PARAMS.num_eval == eval_file.num_rows
    assert ev["eval_samples"] == candidates
    keys = ["request_auc"] + [f"{name}@{k}" for k in (1, 3, 5) for name in ("recall", "ndcg")]
    for key in keys:
        assert key in ev and f"{key}/cand_click" in ev, key
        assert 0.0 <= ev[key] <= 1.0, (key, ev[key])
    assert not any(k.startswith(("recall@10", "ndcg@10")) for k in ev)  # eval.ks from the config, not defaults
    assert ev["notes"] == []
    # The planted parity signal is learnt: well above chance (a random ranking has request AUC 0.5).
    assert ev["request_auc"] > 0.75, ev["request_auc"]
    assert ev["ndcg@1"] > 0.7 and ev["recall@5"] > ev["recall@1"]
    # The best checkpoint is picked by the entry's select_metric.
    assert m["best"]["metric"] == "ndcg@5" and m["best"]["value"] == ev["ndcg@5"]
    losses = [e.value for e in _scalars(run_dir).Scalars("train/bce")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------- cotrain_tiny


@pytest.fixture(scope="module")
def cotrain_full(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("cotrain") / "full"
    return run_dir, _torchrun(COTRAIN_CONFIG, run_dir, _data_overrides(tiny_data) + ["train.log_every=1"])


def test_cotrain_plans_both_tables_and_logs_loss_parts(cotrain_full):
    run_dir, m = cotrain_full
    assert m["model"] == "cotrain_tiny" and m["steps"] == 20 and m["world_size"] == 2
    assert m["eval"]["eval_samples"] == 1024 and 0.0 < m["auc"] < 1.0 and math.isfinite(m["logloss"])
    plan = json.loads((run_dir / "plan.json").read_text())
    planned = {table for tables in plan.values() for table in tables}
    names = {f"t_{f}__{role}" for f in ("user_id", "item_id", "item_category") for role in "ab"}
    assert planned == names, planned
    text = (run_dir / "plan.txt").read_text()
    assert "t_item_id__a" in text and "t_item_id__b" in text
    acc = _scalars(run_dir)
    parts = {name: [e.value for e in acc.Scalars(f"train/{name}")] for name in ("loss", "bce_a", "bce_b", "kl")}
    assert all(len(v) == 20 for v in parts.values()), {k: len(v) for k, v in parts.items()}
    for step in range(20):  # loss = bce_a + bce_b + 0.1 * kl (kl_weight in the config), a symmetric KL >= 0
        total = parts["bce_a"][step] + parts["bce_b"][step] + 0.1 * parts["kl"][step]
        assert math.isclose(parts["loss"][step], total, rel_tol=1e-5), (step, parts["loss"][step], total)
        assert parts["kl"][step] >= 0.0
    assert sum(parts["bce_a"][-5:]) < sum(parts["bce_a"][:5]), parts["bce_a"]


def test_cotrain_stopped_and_resumed_matches_uninterrupted(cotrain_full, tiny_data, tmp_path):
    _, full = cotrain_full
    part = tmp_path / "part"
    common = _data_overrides(tiny_data) + ["train.log_every=1"]
    first = _torchrun(COTRAIN_CONFIG, part, common + ["train.max_steps=10"])
    assert first["steps"] == 10
    resumed = _torchrun(COTRAIN_CONFIG, part, common)
    assert resumed["steps"] == 20 and resumed["steps_this_run"] == 10
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(resumed[key] - full[key]) < 1e-6, (key, resumed[key], full[key])
    assert first["auc"] != full["auc"]  # the comparison is not vacuous
    # The resumed half logged the same loss parts as the uninterrupted run's steps 11..20.
    acc_full, acc_part = _scalars(Path(full["run_dir"])), _scalars(part)
    for name in ("bce_a", "bce_b", "kl"):
        want = {e.step: e.value for e in acc_full.Scalars(f"train/{name}")}
        got = {e.step: e.value for e in acc_part.Scalars(f"train/{name}")}
        for step in range(11, 21):
            assert abs(got[step] - want[step]) < 1e-6, (name, step, got[step], want[step])
