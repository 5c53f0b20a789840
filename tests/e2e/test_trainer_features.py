"""Trainer features end to end (torchrun, gloo, tiny parquet): exact epochs and the best checkpoint.

Exact epochs (``train.epochs``): the real trainer on 1, 2 and 3 ranks over 300 training rows in uneven row
groups whose ``item_id`` is unique per row. A test-only spy, installed in the trainer processes through the
config's ``imports:`` (this module, activated by ``SPY_ENV``), records the rows of every batch the trainer
pulls from :func:`datasets.reader.train_loader` (the trainer's stream holds exactly the batches it trains):
every training row is trained on exactly once per epoch across ranks, every rank takes ``steps_per_epoch``
steps per epoch, and ``metrics.json`` says ``steps == 2 * steps_per_epoch``. A run killed mid-epoch (the spy
kills every rank after the checkpoint at step 7) and run again resumes there, trains the same batches as the
run that never stopped and ends with its metrics. The 2-rank run's checkpoints resume on 1 and on 3 ranks: the
data position is carried over in rows (every row still once per epoch) and the final checkpoint evaluates the same.

Best checkpoint: with several validation evaluations the best one (by ``eval.best_metric`` /
``eval.best_mode``) is the step of ``valid_history``'s best value, ``<run_dir>/best`` holds that step, and the
test split (here the validation files again) is evaluated on it: ``test[metric]`` equals the validation
value at that step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SPY_ENV = "ZOO_TEST_BATCH_SPY_DIR"  # set only for the trainer processes this module starts
KILL_ENV = "ZOO_TEST_KILL_AT_BATCH"
SPY_MODULE = "tests.e2e.test_trainer_features"

ROWS = 300  # training rows; item_id = 1..300 tags them
GROUPS = ([37, 101], [62, 100])  # row groups of the two training files
BATCH = 16
EPOCHS = 2


def _install_spy(out_dir: Path, kill_at: int | None) -> None:
    """Wraps ``launch.trainer.train_loader``: every batch the trainer pulls is appended (step index, valid
    item ids, rows) to ``out_dir/rank<R>.jsonl`` (the step counts from the start of the stream: after a resume on
    another world size, from the resume point); with ``kill_at``, pulling batch ``kill_at`` kills this rank."""
    import launch.trainer as trainer

    real = trainer.train_loader

    class _Spied:
        def __init__(self, loader, rank: int, start_step: int) -> None:
            self.loader, self.rank, self.start_step = loader, rank, start_step

        def __iter__(self):
            with open(out_dir / f"rank{self.rank}.jsonl", "a") as f:
                for i, b in enumerate(self.loader):
                    step = self.start_step + i
                    if kill_at is not None and step >= kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    ids = b.sparse_features["item_id"].values()[b.valid].tolist()
                    f.write(json.dumps({"step": step, "ids": ids, "rows": int(b.batch_size)}) + "\n")
                    f.flush()
                    yield b

    def spied_train_loader(cfg, rank, world_size, start_step=0, sequence_caps=None, epochs=None, stream_start=None):
        loader = real(cfg, rank, world_size, start_step=start_step, sequence_caps=sequence_caps, epochs=epochs,
                      stream_start=stream_start)
        return _Spied(loader, rank, start_step)

    trainer.train_loader = spied_train_loader


if os.environ.get(SPY_ENV):  # imported by a trainer process (config ``imports:``), never by pytest itself
    _install_spy(Path(os.environ[SPY_ENV]), int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None)


# ------------------------------------------------------------------------------------------------ helpers


def _torchrun(nproc: int, run_dir: Path, overrides: list[str], env: dict | None = None,
              config: str = "configs/tests/din_tiny.yaml") -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "launch.train", "--config", config, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def _metrics(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    m = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
    assert m == json.loads((run_dir / "metrics.json").read_text())
    return m


def _records(spy_dir: Path, world: int) -> list[list[dict]]:
    """Per rank, the spied batches in the order the trainer pulled them."""
    out = []
    for r in range(world):
        path = spy_dir / f"rank{r}.jsonl"
        out.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """The tiny synthetic data of tests/e2e (configs/datasets/synthetic_tiny.yaml's sizes)."""
    from datasets.synthetic import SyntheticParams, generate

    out = tmp_path_factory.mktemp("synthetic_tiny")
    generate(out, SyntheticParams(num_samples=4096, num_eval_samples=1024, num_users=200, num_items=1000,
                                  num_categories=50, max_seq_len=100, files=2, row_group_size=512, seed=0))
    return out


@pytest.fixture(scope="module")
def tagged(synthetic: Path, tmp_path_factory) -> Path:
    """300 training rows of the synthetic data in 2 files with row groups 37, 101 | 62, 100 rows, item_id
    rewritten to 1..300 (unique per row: the row's tag); evaluation: 256 synthetic rows."""
    out = tmp_path_factory.mktemp("tagged")
    (out / "train").mkdir()
    (out / "eval").mkdir()
    table = pq.read_table(sorted((synthetic / "train").glob("*.parquet"))[0]).slice(0, ROWS)
    table = table.set_column(table.schema.get_field_index("item_id"), pa.field("item_id", pa.int64(), False),
                             pa.array(range(1, ROWS + 1), pa.int64()))
    start = 0
    for i, sizes in enumerate(GROUPS):
        part = table.slice(start, sum(sizes))
        with pq.ParquetWriter(out / "train" / f"part-{i}.parquet", part.schema) as w:
            offset = 0
            for n in sizes:
                w.write_table(part.slice(offset, n), row_group_size=n)
                offset += n
        start += sum(sizes)
    for i, sizes in enumerate(GROUPS):
        md = pq.ParquetFile(out / "train" / f"part-{i}.parquet").metadata
        assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == sizes
    ev = pq.read_table(sorted((synthetic / "eval").glob("*.parquet"))[0]).slice(0, 256)
    pq.write_table(ev, out / "eval" / "part-0.parquet")
    return out


def _epoch_overrides(data: Path) -> list[str]:
    return [
        f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]",
        f"data.batch_size={BATCH}", f"train.epochs={EPOCHS}", "train.evals_per_epoch=2",
        "train.checkpoint_every=7", "train.keep_checkpoints=10", "model.dropout=0.1", f"imports=[{SPY_MODULE}]",
    ]


def _check_exact_epochs(records: list[list[dict]], spe: int) -> None:
    """Every rank pulled steps 0 .. EPOCHS * spe - 1 once, in order, full batches; in each epoch the valid
    rows over all ranks are item ids 1..ROWS, each exactly once."""
    for rank_records in records:
        assert [r["step"] for r in rank_records] == list(range(EPOCHS * spe))
        assert all(r["rows"] == BATCH for r in rank_records)
    for epoch in range(EPOCHS):
        ids = sorted(i for rank_records in records for r in rank_records if r["step"] // spe == epoch
                     for i in r["ids"])
        assert ids == list(range(1, ROWS + 1)), (epoch, len(ids))


# ------------------------------------------------------------------------------------------- exact epochs


def _epoch_run(world: int, data: Path, out: Path) -> tuple[dict, list[list[dict]]]:
    """An uninterrupted exact-epochs run on ``world`` ranks: its metrics and the spied batches per rank."""
    spy = out / "spy"
    spy.mkdir(parents=True)
    run_dir = out / "run"
    m = _metrics(_torchrun(world, run_dir, _epoch_overrides(data), {SPY_ENV: str(spy)}), run_dir)
    return m, _records(spy, world)


@pytest.fixture(scope="module")
def uninterrupted_w2(tagged: Path, tmp_path_factory) -> tuple[dict, list[list[dict]]]:
    return _epoch_run(2, tagged, tmp_path_factory.mktemp("epochs_w2"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_epochs_train_every_row_once_per_epoch(world: int, tagged: Path, tmp_path: Path, request) -> None:
    from datasets.config import DataConfig
    from datasets.reader import steps_per_epoch

    spe = math.ceil(ROWS / (world * BATCH))  # 19, 10, 7: the last global batch of each epoch is padded
    data = DataConfig(train_paths=[f"{tagged}/train/*.parquet"], batch_size=BATCH)
    assert steps_per_epoch(data, world) == spe
    m, records = request.getfixturevalue("uninterrupted_w2") if world == 2 else _epoch_run(world, tagged, tmp_path)
    assert m["world_size"] == world and m["epochs"] == EPOCHS and m["steps_per_epoch"] == spe
    assert m["steps"] == m["steps_this_run"] == EPOCHS * spe
    _check_exact_epochs(records, spe)
    # Validation twice per epoch (evals_per_epoch=2: after round(k * spe / 2) steps of each epoch), the end included.
    expected = {1: [10, 19, 29, 38], 2: [5, 10, 15, 20], 3: [4, 7, 11, 14]}[world]
    assert [h["step"] for h in m["valid_history"]] == expected


def test_exact_epochs_killed_mid_epoch_and_resumed_match_uninterrupted(
    tagged: Path, tmp_path: Path, uninterrupted_w2: tuple[dict, list[list[dict]]]
) -> None:
    """2 ranks, 10 steps per epoch, checkpoints every 7 steps: every rank is killed when it pulls batch 9
    (after the checkpoint at step 7, inside epoch 0); running the same command again resumes at step 7."""
    spe, world = 10, 2
    spy = tmp_path / "spy"
    spy.mkdir()
    run_dir = tmp_path / "run"
    overrides = _epoch_overrides(tagged)
    killed = _torchrun(world, run_dir, overrides, {SPY_ENV: str(spy), KILL_ENV: "9"})
    assert killed.returncode != 0
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    before = _records(spy, world)
    assert all(r["step"] <= 8 for rank_records in before for r in rank_records)
    shutil.rmtree(spy)
    spy.mkdir()
    resumed = _metrics(_torchrun(world, run_dir, overrides, {SPY_ENV: str(spy)}), run_dir)
    assert resumed["steps"] == EPOCHS * spe and resumed["steps_this_run"] == EPOCHS * spe - 7
    after = _records(spy, world)
    assert all(rank_records[0]["step"] == 7 for rank_records in after)
    # What was trained: steps < 7 of the killed run, then the resumed run: exact epochs again.
    trained = [[r for r in b if r["step"] < 7] + a for b, a in zip(before, after)]
    _check_exact_epochs(trained, spe)

    full, full_records = uninterrupted_w2
    assert trained == full_records  # the same batches, in the same order, on every rank
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(resumed[key] - full[key]) < 1e-6, (key, resumed[key], full[key])
    assert [h["step"] for h in resumed["valid_history"]] == [h["step"] for h in full["valid_history"]]
    for a, b in zip(resumed["valid_history"], full["valid_history"]):
        assert abs(a["auc"] - b["auc"]) < 1e-6, (a, b)
    assert resumed["best"]["step"] == full["best"]["step"]
    assert resumed["first_train_loss_this_run"] != full["first_train_loss_this_run"]  # it did resume


def _copy_checkpoint(src_run: Path, step: int, run_dir: Path) -> None:
    """``run_dir`` with only checkpoint ``step`` of ``src_run``, as its latest."""
    name = f"step_{step:08d}"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / name, run_dir / "checkpoints" / name)
    (run_dir / "checkpoints" / "latest").write_text(name + "\n")


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(
    world: int, tagged: Path, tmp_path: Path, uninterrupted_w2: tuple[dict, list[list[dict]]]
) -> None:
    """The 2-rank run's checkpoint at step 7 (inside epoch 0: 7 x 2 x 16 = 224 of 300 rows read) resumed on
    ``world`` ranks: the tables and optimizer state are resharded (DCP), epoch 0 goes on with the 76 rows the
    2 ranks had not read, epoch 1 is a whole epoch on ``world`` ranks: every row once per epoch over both runs.
    The final checkpoint (step 20) resumed on ``world`` ranks evaluates exactly like the run that wrote it."""
    from datasets.epochs import StreamStart, stream_after, stream_layouts

    full, full_records = uninterrupted_w2
    src = Path(full["run_dir"])
    run_dir = tmp_path / "run"
    _copy_checkpoint(src, 7, run_dir)
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = _torchrun(world, run_dir, _epoch_overrides(tagged), {SPY_ENV: str(spy)})
    m = _metrics(proc, run_dir)
    assert f"written by 2 ranks, resumed on {world}" in proc.stdout and "with the 76 rows no rank had read" in proc.stdout
    start = stream_after(stream_layouts(ROWS, 2, 1, BATCH, False, EPOCHS), 7, EPOCHS)
    assert start.epoch == 0 and sum(b - a for a, b in start.remaining) == ROWS - 7 * 2 * BATCH
    rest = math.ceil((ROWS - 7 * 2 * BATCH) / (world * BATCH))  # 5 steps on 1 rank, 2 on 3
    spe = math.ceil(ROWS / (world * BATCH))  # 19, 7
    assert stream_layouts(ROWS, world, 1, BATCH, False, EPOCHS, start)[0][1].steps == rest
    assert m["world_size"] == world and m["steps"] == 7 + rest + spe and m["steps_this_run"] == rest + spe
    assert m["samples_seen"] == 7 * 2 * BATCH + (rest + spe) * world * BATCH
    after = _records(spy, world)
    for rank_records in after:
        assert [r["step"] for r in rank_records] == list(range(rest + spe))  # counted from the resume point
    for epoch in range(EPOCHS):
        ids = [i for rank_records in full_records for r in rank_records if r["step"] < 7 and r["step"] // 10 == epoch
               for i in r["ids"]]
        ids += [i for rank_records in after for r in rank_records if (r["step"] >= rest) == (epoch == 1)
                for i in r["ids"]]
        assert sorted(ids) == list(range(1, ROWS + 1)), (epoch, len(ids), len(set(ids)))
    # Evaluations: the checkpoint's (step 5), then the rest of epoch 0's at the same share of its rows, epoch 1's.
    expected = {1: [5, 12, 22, 31], 3: [5, 9, 13, 16]}[world]
    assert [h["step"] for h in m["valid_history"]] == expected
    assert 0.5 < m["auc"] <= 1.0

    final_dir = tmp_path / "final"
    _copy_checkpoint(src, EPOCHS * 10, final_dir)
    final = _metrics(_torchrun(world, final_dir, _epoch_overrides(tagged)), final_dir)
    assert final["steps"] == EPOCHS * 10 and final["steps_this_run"] == 0
    for key in ("auc", "gauc", "logloss"):
        assert abs(final[key] - full[key]) < 1e-6, (key, final[key], full[key])


# ------------------------------------------------------------------------------------------ best checkpoint


def _best_index(values: list[float], mode: str) -> int:
    """The first evaluation with the best value (later equal values do not improve)."""
    best = 0
    for i, v in enumerate(values):
        if (v > values[best]) if mode == "max" else (v < values[best]):
            best = i
    return best


def _tb_eval(run_dir: Path, step: int) -> dict[str, float]:
    """The validation scalars TensorBoard holds for ``step``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {k: [e.value for e in acc.Scalars(f"eval/{k}") if e.step == step][-1] for k in ("auc", "gauc", "logloss")}


@pytest.mark.parametrize(
    "overrides, metric, mode, early",
    [
        ([], "auc", "max", False),
        # Learning rates so high that validation AUC peaks at the first evaluation (0.67, later <= 0.6).
        (["optim.dense_lr=0.05", "optim.sparse_lr=0.5"], "auc", "max", True),
        (["eval.best_metric=logloss"], "logloss", "min", False),  # auto: min for *loss*
        (["eval.best_metric=logloss", "eval.best_mode=max"], "logloss", "max", True),  # the worst loss: early
    ],
    ids=["auc", "auc_peaks_early", "logloss_auto_min", "logloss_max"],
)
def test_best_checkpoint_is_the_best_validation_and_the_test_split_uses_it(
    overrides: list[str], metric: str, mode: str, early: bool, synthetic: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    data = [f"data.train_paths=[{synthetic}/train/*.parquet]", f"data.eval_paths=[{synthetic}/eval/*.parquet]",
            f"data.test_paths=[{synthetic}/eval/*.parquet]"]  # test = validation files: comparable values
    m = _metrics(_torchrun(2, run_dir, data + ["train.eval_every=4", "train.max_steps=20", *overrides]), run_dir)
    hist = m["valid_history"]
    assert [h["step"] for h in hist] == [4, 8, 12, 16, 20]
    values = [h[metric] for h in hist]
    assert all(isinstance(v, float) for v in values) and len(set(values)) > 1
    i = _best_index(values, mode)
    best_step = hist[i]["step"]
    assert m["best"] == {"metric": metric, "mode": mode, "value": values[i], "step": best_step}
    assert values[i] == (max(values) if mode == "max" else min(values))
    assert m["eval"][metric] == values[-1]  # the final evaluation is the last history entry
    # <run_dir>/best holds exactly the best step.
    assert (run_dir / "best" / "latest").read_text().strip() == f"step_{best_step:08d}"
    assert [p.name for p in (run_dir / "best").glob("step_*")] == [f"step_{best_step:08d}"]
    assert json.loads((run_dir / "best" / f"step_{best_step:08d}" / "meta.json").read_text())["step"] == best_step
    # The test split is evaluated on the best checkpoint: the validation value of that step.
    test = m["test"]
    if best_step == 20:
        assert test["checkpoint"] == "best (step 20, the final model)"
    else:
        assert test["checkpoint"] == f"best (step {best_step})"
    assert abs(test[metric] - values[i]) < 1e-9, (test[metric], values[i])
    assert test["eval_samples"] == 1024
    at_best = _tb_eval(run_dir, best_step)  # every metric of the validation at that step (float32 in TensorBoard)
    for key, v in at_best.items():
        assert abs(test[key] - v) < 1e-6, (key, test[key], v)
    if early:
        assert best_step < 20
        assert abs(test["auc"] - m["auc"]) > 1e-3  # the test metrics are not the final model's


def test_without_keep_best_the_test_split_uses_the_final_model(synthetic: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    data = [f"data.train_paths=[{synthetic}/train/*.parquet]", f"data.eval_paths=[{synthetic}/eval/*.parquet]",
            f"data.test_paths=[{synthetic}/eval/*.parquet]"]
    m = _metrics(_torchrun(1, run_dir, data + ["train.eval_every=5", "train.max_steps=10", "eval.keep_best=false",
                                               "eval.best_metric=logloss", "eval.best_mode=max"]), run_dir)
    assert not (run_dir / "best").exists()
    assert m["test"]["checkpoint"] == "final"
    for key in ("auc", "gauc", "logloss"):
        assert abs(m["test"][key] - m["eval"][key]) < 1e-12, key
    assert m["best"]["step"] == 5  # recorded, though not kept


def test_replicated_adam_trains_tables_with_torch_adam_and_resumes_exactly(synthetic: Path, tmp_path: Path) -> None:
    """optim.sparse=replicated_adam (Adam on embeddings on CPU): no sharding plan, every rank holds the tables,
    they learn, and a run stopped at step 6 and resumed to 12 equals an uninterrupted 12-step run."""
    data = [f"data.train_paths=[{synthetic}/train/*.parquet]", f"data.eval_paths=[{synthetic}/eval/*.parquet]",
            "optim.sparse=replicated_adam", "optim.sparse_lr=0.01", "train.checkpoint_every=6"]
    full = tmp_path / "full"
    m = _metrics(_torchrun(2, full, data + ["train.max_steps=12"]), full)
    assert m["steps"] == 12 and m["world_size"] == 2 and 0.5 < m["auc"] <= 1.0
    assert "replicated on all 2 ranks" in (full / "plan.txt").read_text()
    assert json.loads((full / "plan.json").read_text()) == {}  # nothing sharded
    part = tmp_path / "part"
    _metrics(_torchrun(2, part, data + ["train.max_steps=6"]), part)
    resumed = _metrics(_torchrun(2, part, data + ["train.max_steps=12"]), part)
    assert resumed["steps_this_run"] == 6
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(resumed[key] - m[key]) < 1e-6, (key, resumed[key], m[key])
    # The tables moved under torch Adam: the checkpoint's item table differs from a fresh run's initial one.
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(full / "checkpoints" / "step_00000012")).read_metadata()
    keys = [k for k in meta.state_dict_metadata if "embeddings.t_item_id.weight" in k]
    assert keys and any(k.startswith("model.") for k in keys), sorted(meta.state_dict_metadata)[:10]
