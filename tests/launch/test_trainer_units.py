"""Trainer pieces, no training run: the run's step count with exact epochs (and its refusal of an epoch without a
step), the evaluation points, the best-checkpoint rule, the metric names ``eval.best_metric`` may name (checked
before training), the resume checks the Trainer makes before it writes anything, and, in a world of one, dense
groups built on the sharded model exactly as validation predicted on the meta model."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from datasets.config import DataConfig
from datasets.schema import DataError, FloatFeature, SchemaConfig
from launch.config import ConfigError, ExperimentConfig, TrainConfig, load_config, validate_experiment
from launch.evaluation import Best, metric_names, task_names
from launch.metrics import MetricOptions
from launch.trainer import DistEnv, Trainer, eval_points, total_steps
from tests.datasets.helpers import small_schema, small_table

ROOT = Path(__file__).resolve().parents[2]
DIN_TINY = ROOT / "configs/tests/din_tiny.yaml"
CTR_NAMES = ["auc", "auc/label", "eval_samples", "eval_samples/label", "gauc", "gauc/label", "logloss",
             "logloss/label"]


@pytest.fixture
def rows36(tmp_path: Path) -> str:
    """36 rows in row groups of 7, 13, 16."""
    path = tmp_path / "rows.parquet"
    table = small_table(36)
    with pq.ParquetWriter(path, table.schema) as w:
        for a, b in ((0, 7), (7, 20), (20, 36)):
            w.write_table(table.slice(a, b - a), row_group_size=b - a)
    return str(path)


def _exp(paths: list[str], batch_size: int, drop_last: bool = False, **train) -> ExperimentConfig:
    data = DataConfig(schema=small_schema(), train_paths=paths, eval_paths=paths, batch_size=batch_size,
                      drop_last=drop_last)
    return ExperimentConfig(data=data, train=TrainConfig(**train))


# -------------------------------------------------------------------------------- steps and evaluation points


@pytest.mark.parametrize("world, batch, drop_last, spe", [(1, 5, False, 8), (2, 5, False, 4), (2, 5, True, 3),
                                                         (3, 4, False, 3), (3, 4, True, 3), (3, 5, True, 2)])
def test_total_steps_is_epochs_times_steps_per_epoch(rows36, world, batch, drop_last, spe) -> None:
    assert spe == (36 // (world * batch) if drop_last else math.ceil(36 / (world * batch)))
    assert total_steps(_exp([rows36], batch, drop_last, epochs=3), world) == 3 * spe
    assert total_steps(_exp([rows36], batch, drop_last, epochs=0, max_steps=17), world) == 17  # max_steps


def test_exact_epochs_without_a_step_are_a_data_error(rows36) -> None:
    with pytest.raises(DataError, match=r"36 rows give no step per epoch with world_size x batch_size = 2 x 20 "
                                        r"and data.drop_last=true"):
        total_steps(_exp([rows36], 20, True, epochs=1), 2)
    assert total_steps(_exp([rows36], 20, False, epochs=1), 2) == 1  # padded instead


def test_eval_points(rows36) -> None:
    # max_steps: every eval_every steps and the end.
    assert eval_points(_exp([rows36], 5, max_steps=10, eval_every=3), 1, 10) == [3, 6, 9, 10]
    assert eval_points(_exp([rows36], 5, max_steps=10), 1, 10) == [10]
    # epochs, 4 steps per epoch (world 2, batch 5): evals_per_epoch at e * 4 + max(1, round(k * 4 / n)).
    assert eval_points(_exp([rows36], 5, epochs=2, evals_per_epoch=2), 2, 8) == [2, 4, 6, 8]
    assert eval_points(_exp([rows36], 5, epochs=2, evals_per_epoch=3), 2, 8) == [1, 3, 4, 5, 7, 8]
    assert eval_points(_exp([rows36], 5, epochs=2, evals_per_epoch=3, eval_every=5), 2, 8) == [1, 3, 4, 5, 7, 8]
    assert eval_points(_exp([rows36], 5, epochs=2, evals_per_epoch=8), 2, 8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert eval_points(_exp([rows36], 5, epochs=2, eval_every=3), 2, 8) == [3, 6, 8]


# --------------------------------------------------------------------------------------------- best rule


def test_best_max_min_ties_and_undefined_values() -> None:
    b = Best("auc", "max")
    assert b.state() == {"metric": "auc", "mode": "max", "value": None, "step": None}
    assert not b.update({"auc": float("nan")}, 1)  # undefined never improves, even the first time
    assert not b.update({"auc": None}, 2)
    assert b.update({"auc": 0.6}, 3) and b.update({"auc": 0.7}, 4)
    assert not b.update({"auc": 0.7}, 5) and not b.update({"auc": 0.65}, 6)  # a tie keeps the earlier step
    assert b.state() == {"metric": "auc", "mode": "max", "value": 0.7, "step": 4}
    m = Best("logloss", "min")
    for step, v in ((1, 0.6), (2, 0.5), (3, 0.55), (4, 0.5)):
        m.update({"logloss": v}, step)
    assert (m.value, m.step) == (0.5, 2)


def test_best_unknown_metric_lists_the_computed_ones() -> None:
    with pytest.raises(KeyError, match=r"eval.best_metric 'foo' is not computed by this entry; it has \['auc', 'n'\]"):
        Best("foo", "max").update({"auc": 0.5, "n": 3, "notes": []}, 1)


# ----------------------------------------------------------------------------- metric names (best_metric)


def test_metric_names_and_task_names() -> None:
    assert metric_names("ctr", ["label"], MetricOptions()) == CTR_NAMES
    assert metric_names("ctr", ["a", "b"], MetricOptions())[:3] == ["auc", "auc/a", "auc/b"]
    ranking = metric_names("ranking", ["click"], MetricOptions(ks=[2, 7]))
    assert {"request_auc", "request_auc/click", "recall@2", "ndcg@7/click", "requests"} <= set(ranking)
    assert not any("@1" in k or "@5" in k for k in ranking)  # the configured ks only
    assert task_names("ctr", small_schema()) == ["label"] and task_names("ranking", small_schema()) == ["label"]
    requests = SchemaConfig(labels=[], sequence_labels=[FloatFeature("cand_click", sequence=True, group="candidates")])
    assert task_names("ranking", requests) == ["cand_click"] and task_names("ctr", requests) == ["cand_click"]


@pytest.mark.parametrize("metric", ["auc", "gauc/label", "logloss", "eval_samples"])
def test_validate_accepts_computed_best_metrics(metric: str) -> None:
    cfg, spec, _ = load_config(DIN_TINY, [f"eval.best_metric={metric}"])
    validate_experiment(cfg, spec)


@pytest.mark.parametrize("metric", ["foo", "auc/click", "recall@5", "notes"])
def test_validate_refuses_a_best_metric_the_entry_does_not_compute(metric: str) -> None:
    cfg, spec, _ = load_config(DIN_TINY, [f"eval.best_metric={metric}"])
    with pytest.raises(ConfigError) as e:
        validate_experiment(cfg, spec)
    assert str(e.value) == (
        f"eval.best_metric {metric!r} is not computed by the 'ctr' metric set of model (din); it computes {CTR_NAMES}"
    )


# ----------------------------------------------------------------------------- the Trainer before it writes


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from datasets.synthetic import SyntheticParams, generate

    out = tmp_path_factory.mktemp("synthetic_small")
    generate(out, SyntheticParams(num_samples=512, num_eval_samples=128, num_users=200, num_items=1000,
                                  num_categories=50, max_seq_len=100, files=1, row_group_size=128, seed=0))
    return out


def _trainer(data: Path, run_dir: Path, *overrides: str) -> Trainer:
    cfg, spec, resolved = load_config(DIN_TINY, [f"run_dir={run_dir}", f"data.train_paths=[{data}/train/*.parquet]",
                                                 f"data.eval_paths=[{data}/eval/*.parquet]", *overrides])
    validate_experiment(cfg, spec)
    return Trainer(cfg, spec, resolved, DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1))


def test_trainer_settings(tiny_data: Path, tmp_path: Path) -> None:
    t = _trainer(tiny_data, tmp_path / "run", "train.epochs=2", "data.batch_size=100", "train.evals_per_epoch=2",
                 "eval.best_metric=logloss")
    assert t.total == 12 and t.points == [3, 6, 9, 12]  # 512 rows / 100: 6 steps per epoch (the last padded)
    assert (t.best.metric, t.best.mode) == ("logloss", "min")  # auto: min for *loss*
    assert t.position["epochs"] == 2 and t.position["batch_size"] == 100 and t.position["sequence_caps"]
    t = _trainer(tiny_data, tmp_path / "run", "eval.best_metric=logloss", "eval.best_mode=max")
    assert (t.best.metric, t.best.mode, t.total, t.points) == ("logloss", "max", 20, [20])
    assert _trainer(tiny_data, tmp_path / "run").best.metric == "auc"  # the entry's select_metric
    assert t.check_resumable() is None and not (tmp_path / "run").exists()  # nothing written


def _fake_checkpoint(run_dir: Path, step: int, files: tuple[str, ...] = ("meta.json", ".metadata")) -> None:
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_text('{"step": %d, "world_size": 1, "samples_seen": 0}' % step if f == "meta.json" else "x")
    (run_dir / "checkpoints" / "latest").write_text(d.name + "\n")


def test_check_resumable_refusals(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "incomplete"
    _fake_checkpoint(run_dir, 3, files=("meta.json",))  # no DCP .metadata: a save that never finished
    with pytest.raises(ConfigError, match=r"names 'step_00000003', which is not a complete checkpoint \(no "
                                          r"step_00000003/.metadata\)"):
        _trainer(tiny_data, run_dir).check_resumable()
    run_dir = tmp_path / "nometa"
    _fake_checkpoint(run_dir, 3, files=(".metadata",))
    with pytest.raises(ConfigError, match="no step_00000003/meta.json"):
        _trainer(tiny_data, run_dir).check_resumable()
    run_dir = tmp_path / "complete"
    _fake_checkpoint(run_dir, 3)
    with pytest.raises(ConfigError, match="already holds checkpoints .latest: step_00000003. and train.resume=false"):
        _trainer(tiny_data, run_dir, "train.resume=false").check_resumable()
    # Written by another world size, or the old data position missing: the world size is checked.
    (run_dir / "checkpoints" / "step_00000003" / "meta.json").write_text('{"step": 3, "world_size": 2, '
                                                                          '"samples_seen": 0}')
    with pytest.raises(ConfigError, match="written by 2 ranks, this run has 1"):
        _trainer(tiny_data, run_dir).check_resumable()
    run_dir = tmp_path / "ckfile"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    data = [f"data.train_paths=[{tiny_data}/train/*.parquet]", f"data.eval_paths=[{tiny_data}/eval/*.parquet]"]
    cfg, spec, resolved = load_config(DIN_TINY, [f"run_dir={run_dir}", *data])
    with pytest.raises(ConfigError, match="checkpoints exists and is not a directory"):
        validate_experiment(cfg, spec)
    with pytest.raises(ConfigError, match="checkpoints exists and is not a directory"):  # the Trainer's own check
        Trainer(cfg, spec, resolved, DistEnv(0, 1, 0, 1)).check_resumable()


# ------------------------------------------------------------------ dense groups on the sharded model (world 1)


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dense_groups_of_the_built_trainer_are_what_validation_saw(tiny_data: Path, tmp_path: Path,
                                                                   world_of_one) -> None:
    from launch.optim import _strip, table_parameters

    groups = 'optim.dense_groups={attn: {params: ["model.attention.*"], lr: 0.01, optimizer: sgd}}'
    t = _trainer(tiny_data, tmp_path / "run", groups)
    meta_module = t.spec.build_train_module(t.spec.build(t.cfg.model, t.schema, torch.device("meta")), t.cfg.model)
    tables = {id(p) for p in table_parameters(meta_module).values()}
    dense = [n for n, p in meta_module.named_parameters() if id(p) not in tables]
    expected_attn = sorted(n for n in dense if n.startswith("model.attention."))
    assert expected_attn and len(expected_attn) < len(dense)
    t.build()
    names = [name for name, _ in t.optimizer.optimizers]
    assert names == ["fused", "attn", "default"]
    attn, default = t.dense_optimizers
    assert sorted(_strip(n) for n in attn.params) == expected_attn
    assert sorted(_strip(n) for n in default.params) == sorted(set(dense) - set(expected_attn))
    assert attn.param_groups[0]["lr"] == 0.01 and "momentum" in attn.param_groups[0]  # SGD
    assert default.param_groups[0]["lr"] == t.cfg.optim.dense_lr == 0.005 and "betas" in default.param_groups[0]


def test_exact_epoch_checkpoint_of_another_world_size_resumes_in_rows(tiny_data: Path, tmp_path: Path) -> None:
    """A 2-rank checkpoint at step 2 of 512 rows x 2 epochs (batch 100: 3 steps per epoch on 2 ranks) resumed
    on 1 rank: epoch 0 goes on with the 112 rows the 2 ranks had not read (2 steps of 100, the last padded),
    then a whole epoch of 6 steps; evaluations at the same shares of the epochs' rows. With mapping: mch the
    resize is refused (each row-wise shard keeps the id map of its own block of ids)."""
    from datasets.schema import IdMapping
    from launch.schedule import Segment

    run_dir = tmp_path / "run"
    over = ("train.epochs=2", "data.batch_size=100", "train.evals_per_epoch=2")
    t = _trainer(tiny_data, run_dir, *over)
    position = t.position
    _fake_checkpoint(run_dir, 2)
    (run_dir / "checkpoints" / "step_00000002" / "meta.json").write_text(json.dumps(
        {"step": 2, "world_size": 2, "samples_seen": 400, "data_position": position}))
    t = _trainer(tiny_data, run_dir, *over)
    assert t.check_resumable() is not None
    assert t.segment.base_step == 2 and t.segment.start.epoch == 0
    assert t.segment.start.remaining == ((200, 256), (456, 512))  # rank r read its first 200 of 256 positions
    assert t.total == 2 + 2 + 6
    # Epoch 0's second evaluation (all its rows) after the 2 remainder steps; epoch 1's at 3 and 6 of its steps.
    assert t.points == [4, 7, 10]
    assert Segment.from_json(t.segment.to_json()) == t.segment
    t = _trainer(tiny_data, run_dir, *over)
    t.schema.id_features[0].mapping = IdMapping.mch
    with pytest.raises(ConfigError, match="use mapping: mch, whose row-wise shards each keep the id map"):
        t.check_resumable()
    t = _trainer(tiny_data, run_dir, "data.batch_size=100")  # the infinite stream: refused, with the advice
    (run_dir / "checkpoints" / "step_00000002" / "meta.json").write_text(json.dumps(
        {"step": 2, "world_size": 2, "samples_seen": 400, "data_position": t.position}))
    with pytest.raises(ConfigError, match="train by exact epochs .train.epochs., which resume on any number of ranks"):
        t.check_resumable()
