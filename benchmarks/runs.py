"""Shared by the benchmark scripts that train zoo entries: one ``launch.train`` run on 2 local gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def torchrun_train(config: str, run_dir: Path, overrides: Sequence[str], label: str) -> dict:
    """Trains ``config`` into ``run_dir`` on 2 ranks (``OMP_NUM_THREADS=1``) and returns its metrics.json; a
    finished run (its metrics.json exists) is reused. Exits with the run's stderr tail when it fails."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "launch.train", "--config", config, f"run_dir={run_dir}", "train.progress_bar=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(metrics.read_text())
