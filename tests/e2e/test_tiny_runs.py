"""Tiny end-to-end runs: 2 gloo processes, synthetic parquet, ~20 steps.

Checks: loss finite and falling (from the TensorBoard events), metrics JSON on the last stdout line and in
metrics.json, checkpoint written, and a run stopped at step 10 and resumed ends with the same metrics as a
run that never stopped. One run goes through TorchX (``-j 2x1``: two single-process "nodes" on this host).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pyarrow import array as pq_array
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets.synthetic import SyntheticParams, generate
from models.registry import all_specs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_tiny")
    # Parameters matching configs/datasets/synthetic_tiny.yaml (table sizes = ranges + 1).
    generate(
        out,
        SyntheticParams(
            num_samples=4096, num_eval_samples=1024, num_users=200, num_items=1000, num_categories=50,
            max_seq_len=100, files=2, row_group_size=512, seed=0,
        ),
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_overrides(data: Path) -> list[str]:
    return [f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]"]


def _torchrun_proc(config: str, run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.train", "--config", config, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _torchrun(config: str, run_dir: Path, overrides: list[str]) -> dict:
    proc = _torchrun_proc(config, run_dir, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    return json.loads(last)


def _losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


# The zoo's entries (not the test entries of tests/entries, which register when imported): the per-sample CTR
# entries on the tiny synthetic data, the request-level pre-rankers on the tiny synthetic request data.
ZOO = sorted(n for n, spec in all_specs().items() if spec.config_cls.__module__.startswith("models."))
PRERANKING = [n for n in ZOO if all_specs()[n].metrics == "preranking"]
CTR = [n for n in ZOO if n not in PRERANKING]


@pytest.fixture(scope="module")
def request_data(tmp_path_factory) -> Path:
    from tests.datasets.test_synthetic_requests import TINY  # the parameters of synthetic_requests_tiny.yaml
    from datasets.synthetic_requests import generate as generate_requests

    out = tmp_path_factory.mktemp("synthetic_requests_tiny")
    generate_requests(out, TINY)
    return out


@pytest.mark.parametrize("entry", PRERANKING)
def test_preranking_tiny_run_trains_and_reports(entry, request_data, tmp_path):
    run_dir = tmp_path / entry
    paths = [f"data.train_paths=[{request_data}/train/*.parquet]", f"data.eval_paths=[{request_data}/valid/*.parquet]",
             f"data.test_paths=[{request_data}/test/*.parquet]"]
    m = _torchrun(f"configs/tests/{entry}_tiny.yaml", run_dir, paths + ["train.log_every=1"])
    assert m["model"] == entry and m["steps"] == 20 and m["world_size"] == 2
    ev = m["eval"]
    # Every validation request once, each candidate once per task; the exposed-click task only on exposed ones.
    assert ev["requests/cand_true_click"] == ev["requests/cand_click@all"] == 200
    assert ev["eval_samples/cand_click"] < ev["eval_samples/cand_true_click"] == ev["eval_samples"]
    for key in ("auc", "uauc", "logloss", "auc/cand_true_click", "uauc/cand_true_click", "recall@10/cand_click@all",
                "ndcg@5/cand_click@all", "request_auc/cand_true_click"):
        assert isinstance(ev[key], float) and 0.0 <= ev[key] <= 1.0 or key == "logloss", (key, ev[key])
    assert m["auc"] == ev["auc/cand_click"] and m["test"]["checkpoint"].startswith("best")
    losses = _losses(run_dir)
    assert len(losses) == 20 and all(l == l and abs(l) < 1e3 for l in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    plan = (run_dir / "plan.txt").read_text()
    if all_specs()[entry].config_cls().training.value == "cotrain":  # two sub-models: both sets of tables planned
        assert "t_item_id__a" in plan and "t_item_id__b" in plan
        acc = EventAccumulator(str(run_dir / "tb"))
        acc.Reload()
        assert {"train/kl", "train/pseudo_a", "train/bce_b"} <= set(acc.Tags()["scalars"])
    else:
        assert "t_item_id" in plan and "__a" not in plan


@pytest.mark.parametrize("entry", CTR)
def test_tiny_run_trains_and_reports(entry, tiny_data, tmp_path):
    run_dir = tmp_path / entry
    m = _torchrun(f"configs/tests/{entry}_tiny.yaml", run_dir, _data_overrides(tiny_data) + ["train.log_every=1"])
    assert m == json.loads((run_dir / "metrics.json").read_text())
    for key in ("model", "auc", "gauc", "logloss", "samples_per_s", "steps", "run_dir"):
        assert key in m
    assert m["model"] == entry and m["steps"] == 20 and m["world_size"] == 2
    assert m["eval"]["eval_samples"] == 1024  # every evaluation row exactly once across the 2 ranks
    losses = _losses(run_dir)
    assert len(losses) == 20 and all(l == l and abs(l) < 1e3 for l in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert 0.5 < m["auc"] <= 1.0 and m["logloss"] < 0.75
    assert (run_dir / "plan.json").is_file() and "t_item_id" in (run_dir / "plan.txt").read_text()
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_stopped_and_resumed_run_matches_uninterrupted(tiny_data, tmp_path):
    common = _data_overrides(tiny_data) + ["model.dropout=0.1"]
    full = _torchrun("configs/tests/din_tiny.yaml", tmp_path / "full", common)
    part = tmp_path / "part"
    first = _torchrun("configs/tests/din_tiny.yaml", part, common + ["train.max_steps=10"])
    assert first["steps"] == 10
    resumed = _torchrun("configs/tests/din_tiny.yaml", part, common)
    assert resumed["steps"] == 20 and resumed["steps_this_run"] == 10
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(resumed[key] - full[key]) < 1e-6, (key, resumed[key], full[key])
    assert first["auc"] != full["auc"]  # the comparison is not vacuous


def test_mid_run_evaluation_does_not_change_training(tiny_data, tmp_path):
    """Evaluating every 5 steps (which rebuilds the pipeline) ends exactly where a run without it ends."""
    common = _data_overrides(tiny_data) + ["train.checkpoint_every=0", "model.dropout=0.1"]
    plain = _torchrun("configs/tests/din_tiny.yaml", tmp_path / "plain", common)
    evald = _torchrun("configs/tests/din_tiny.yaml", tmp_path / "evald", common + ["train.eval_every=5"])
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(plain[key] - evald[key]) < 1e-6, (key, plain[key], evald[key])
    acc = EventAccumulator(str(tmp_path / "evald" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/auc")] == [5, 10, 15, 20]


def test_bad_row_fails_the_run_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    """An out-of-range id met mid-run stops it with the file / row group / row / column (exit 3); the
    checkpoint written before stays the latest and resuming from it works. A run that stops before the bad
    batch never reads it (the pipeline reads ahead only within the steps it will train)."""
    import pyarrow.parquet as pq

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    table = pq.read_table(next((tiny_data / "train").glob("*.parquet")))
    ids = table.column("item_id").to_pylist()
    ids[700] = 10**6  # the table has 1001 rows
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pq_array(ids))
    bad_file = bad_dir / "bad.parquet"
    pq.write_table(table, bad_file, row_group_size=512)
    run_dir = tmp_path / "run"
    bad = [f"data.train_paths=[{bad_file}]", f"data.eval_paths=[{tiny_data}/eval/*.parquet]"]
    first = _torchrun("configs/tests/din_tiny.yaml", run_dir, bad + ["train.max_steps=5"])
    assert first["steps"] == 5
    # One epoch of the bad file is 2048 rows = 16 steps of 2 x 64: the bad row is met before step 5 + 16.
    proc = _torchrun_proc("configs/tests/din_tiny.yaml", run_dir, bad + ["train.max_steps=40", "train.checkpoint_every=1000"])
    assert proc.returncode != 0
    err = proc.stderr
    assert "data error:" in err and str(bad_file) in err and "row group 1" in err and "row 700" in err, err[-4000:]
    assert "'item_id'" in err
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = _torchrun("configs/tests/din_tiny.yaml", run_dir, bad + ["train.max_steps=8"])
    assert resumed["steps"] == 8 and resumed["steps_this_run"] == 3
    # Resuming on another data stream, or starting over in a run_dir that has checkpoints, is refused.
    proc = _torchrun_proc("configs/tests/din_tiny.yaml", run_dir, bad + ["train.max_steps=9", "data.batch_size=32"])
    assert proc.returncode != 0 and "different data stream (batch_size: checkpoint 64, now 32)" in proc.stderr
    proc = _torchrun_proc("configs/tests/din_tiny.yaml", run_dir, bad + ["train.resume=false"])
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr

    # The clip policy trains through it and counts each trained occurrence exactly once: one epoch of the bad
    # file is 16 steps (the pipeline's prefetch into the next epoch is not counted), the count survives a resume.
    clip_dir = tmp_path / "clip"
    clip = [f"data.train_paths=[{bad_file}]", f"data.eval_paths=[{tiny_data}/eval/*.parquet]", "data.id_policy=clip"]
    m16 = _torchrun("configs/tests/din_tiny.yaml", clip_dir, clip + ["train.max_steps=16"])
    assert m16["id_fixes"]["item_id"] == 1 and sum(m16["id_fixes"].values()) == 1
    assert m16["id_fixes_eval"]["item_id"] == 0
    m32 = _torchrun("configs/tests/din_tiny.yaml", clip_dir, clip + ["train.max_steps=32"])
    assert m32["steps_this_run"] == 16 and m32["id_fixes"]["item_id"] == 2


def test_torchx_two_nodes_on_one_host(tiny_data, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    run_dir = tmp_path / "torchx"
    cmd = [str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train",
           "-j", "2x1", "--rdzv_port", str(_free_port()), "--config", "configs/tests/avgpool_tiny.yaml", f"run_dir={run_dir}", "train.max_steps=6",
           *_data_overrides(tiny_data)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == 6 and m["world_size"] == 2 and m["model"] == "avgpool"


def test_duet_trains_on_converted_recflow_logs(tmp_path):
    """The real-data path: RecFlow's published layout (a labelled-synthetic fixture) -> datasets.recflow ->
    configs/experiments/duet_recflow.yaml on 2 ranks (tiny dims, a few steps): the exposure metrics and the
    pre-ranking protocol's Recall/NDCG@K over every candidate come out; there is no entire-space task."""
    from tests.datasets.test_recflow import write_recflow

    root = write_recflow(tmp_path / "raw")
    out = tmp_path / "recflow"
    proc = subprocess.run([sys.executable, "-m", "datasets.recflow", "--input", str(root), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    overrides = [f"data.meta_path={out}/meta.json", f"data.train_paths=[{out}/train/*.parquet]",
                 f"data.eval_paths=[{out}/test/*.parquet]", "data.test_paths=[]",  # the fixture's valid day has 1 request
                 "data.batch_size=2", "train.epochs=0", "train.evals_per_epoch=0", "train.max_steps=4",
                 "model.embedding_dim=8", "model.model_dim=8", "model.mlp_hidden=[8]", "eval.ks=[1,2]"]
    m = _torchrun("configs/experiments/duet_recflow.yaml", tmp_path / "run", overrides)
    assert m["model"] == "duet" and m["steps"] == 4
    ev = m["eval"]
    assert "cand_true_click" not in " ".join(ev) and "recall@2/cand_click@all" in ev and "uauc/cand_exposed" in ev
    assert ev["requests/cand_click@all"] == ev["requests/cand_exposed"] > 0


@pytest.mark.parametrize("entry", ["dare", "duet"])
def test_two_nodes_under_torchx_match_one_node_of_two_processes(entry, tiny_data, request_data, tmp_path):
    """``-j 2x1`` (TorchX, two single-process "nodes" on this host, c10d rendezvous) ends with exactly the
    metrics of ``--nproc_per_node 2`` on one node, same seed: DARE (its attention and representation tables
    sharded apart) and DUET's co-training (two sub-models' tables in one plan)."""
    if entry == "duet":
        data = [f"data.train_paths=[{request_data}/train/*.parquet]", f"data.eval_paths=[{request_data}/valid/*.parquet]",
                "data.test_paths=[]"]
    else:
        data = _data_overrides(tiny_data)
    common = [*data, "train.max_steps=8", "train.checkpoint_every=0", "train.seed=3"]
    one = _torchrun(f"configs/tests/{entry}_tiny.yaml", tmp_path / "1x2", common)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    run_dir = tmp_path / "2x1"
    cmd = [str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train",
           "-j", "2x1", "--rdzv_port", str(_free_port()), "--config", f"configs/tests/{entry}_tiny.yaml",
           f"run_dir={run_dir}", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = json.loads((run_dir / "metrics.json").read_text())
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"] == 8
    for key in ("auc", "logloss", "final_train_loss"):
        assert two[key] == one[key], (key, two[key], one[key])
    assert json.loads((run_dir / "plan.json").read_text()) == json.loads((tmp_path / "1x2" / "plan.json").read_text())



@pytest.mark.parametrize("victim", ["first", "last"])
def test_a_rank_killed_under_torchx_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run(
    victim, tiny_data, tmp_path
):
    """``--max_restarts 1``: kill -9 of one worker (the first or the last started) after the step-10 checkpoint;
    torchrun's agent restarts the worker group (on a store prefix of its own: :func:`launch.train.init_process_group`),
    which resumes from the latest checkpoint and ends with the metrics of a run that was never killed."""
    import signal
    import time

    common = [*_data_overrides(tiny_data), "train.max_steps=40", "train.checkpoint_every=10", "model.dropout=0.1"]
    plain = _torchrun("configs/tests/din_tiny.yaml", tmp_path / "plain", common)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    run_dir = tmp_path / "killed"
    cmd = [str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train",
           "-j", "1x2", "--rdzv_port", str(_free_port()), "--max_restarts", "1", "--config",
           "configs/tests/din_tiny.yaml", f"run_dir={run_dir}", *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    killed = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and killed is None:
            if latest.is_file() and latest.read_text().strip() == "step_00000010":
                pids = subprocess.run(["pgrep", "-f", f"launch.train.*run_dir={run_dir}"], capture_output=True,
                                      text=True).stdout.split()
                workers = sorted((p for p in pids if "torchrun" not in Path(f"/proc/{p}/cmdline").read_text(
                    errors="ignore")), key=int)
                if len(workers) == 2:
                    killed = workers[0 if victim == "first" else -1]
                    os.kill(int(killed), signal.SIGKILL)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:  # never leave a hung job behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert killed is not None, "the run ended before a worker could be killed" + err[-3000:]
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    assert "failed (exitcode: -9)" in out + err  # the agent saw the kill and restarted the group
    m = json.loads((run_dir / "metrics.json").read_text())
    # The restarted group resumed from a checkpoint (10, or 20 on a slow machine) rather than starting over.
    assert m["steps"] == 40 and m["steps_this_run"] in (20, 30)
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(m[key] - plain[key]) < 1e-6, (key, m[key], plain[key])


def test_the_component_passes_max_restarts_to_torchrun():
    """``--max_restarts N`` reaches torchrun's elastic agent (restarts of the worker group); 0 leaves it out."""
    from launch.components import train

    cmd = train("train.max_steps=3", config="configs/tests/din_tiny.yaml", j="2x1", max_restarts=2).roles[0].args[-1]
    assert cmd.startswith("torchrun --max_restarts 2 ") and "-m launch.train" in cmd and "train.max_steps=3" in cmd
    assert "--max_restarts" not in train(config="configs/tests/din_tiny.yaml").roles[0].args[-1]
