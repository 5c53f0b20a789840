"""``python -m launch.twin_cache`` on a tiny trained TWIN run: the cache reproduces the live GSU end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.synthetic import SyntheticParams, generate

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_cache_from_a_checkpoint_matches_the_live_gsu(tmp_path):
    data = tmp_path / "data"
    generate(data, SyntheticParams(num_samples=1024, num_eval_samples=256, num_users=200, num_items=1000,
                                   num_categories=50, max_seq_len=100, files=1, row_group_size=256, seed=0))
    run_dir = tmp_path / "run"
    paths = [f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    train = [sys.executable, "-m", "launch.train", "--config", "configs/tests/twin_tiny.yaml", f"run_dir={run_dir}",
             "train.max_steps=8", *paths]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    cache = [sys.executable, "-m", "launch.twin_cache", "--config", "configs/tests/twin_tiny.yaml", "--run-dir",
             str(run_dir), "--eval", *paths]
    proc = subprocess.run(cache, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta, report = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert meta["table"] == "t_item_id__gsu_cache" and meta["rows"] == 1001 and meta["width"] == 4 * 4
    assert meta["items_seen"] + meta["items_unseen"] == 1000 and meta["items_with_several_values"] == 0
    assert (run_dir / "gsu_cache" / ".metadata").is_file() and (run_dir / "gsu_cache" / "cache.json").is_file()
    # The checkpoint really was loaded: the live path reproduces the trained run's validation AUC.
    assert abs(report["auc_live"] - trained["best"]["value"]) < 1e-6
    # The same scores up to float rounding (the two projections run in other batch shapes): near-tied neighbours
    # at the K-th place may swap, nothing else.
    assert report["max_gsu_score_diff"] < 1e-4, report
    assert report["rows_with_identical_topk"] > 0.9 and abs(report["auc_cached"] - report["auc_live"]) < 2e-3
    # A missing checkpoint is one line and exit 2.
    proc = subprocess.run(cache[:-3] + ["--checkpoint", str(tmp_path / "nothing"), *paths], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "no " in proc.stderr and "checkpoint" in proc.stderr
