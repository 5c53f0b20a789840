"""Optimizer config: the fused-optimizer support check (adam on CPU is a config error naming the optimizer, the
table and what CPU supports, before training: exit 2 with one line), per-table settings (exact name beats a
glob, the first glob in config order wins, every key must match a table) and dense groups (first group wins,
DMP prefixes stripped, a group matching nothing is an error, also at validation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.config import ConfigError, load_config, validate_experiment
from launch.optim import (
    FUSED_SUPPORT,
    DenseGroupConfig,
    OptimConfig,
    SparseGroupConfig,
    SparseOptimizer,
    apply_sparse_optimizers,
    check_support,
    dense_groups,
    table_parameters,
    table_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DIN_TINY = ROOT / "configs/tests/din_tiny.yaml"
DIN_TABLES = ["t_item_category", "t_item_id", "t_user_id"]  # sorted
CPU_LIST = "['sgd', 'adagrad', 'rowwise_adagrad']"


def _validate(*overrides: str) -> None:
    cfg, spec, _ = load_config(DIN_TINY, list(overrides))
    validate_experiment(cfg, spec)


# ------------------------------------------------------------------------------------ fused support check


def test_fused_support_per_device() -> None:
    S = SparseOptimizer
    assert FUSED_SUPPORT["cpu"] == (S.sgd, S.adagrad, S.rowwise_adagrad)
    assert set(FUSED_SUPPORT["cuda"]) == {S.sgd, S.adagrad, S.rowwise_adagrad, S.adam}


def test_check_support_refuses_adam_on_cpu_naming_table_and_supported_list() -> None:
    cfg = OptimConfig(sparse=SparseOptimizer.adam)
    with pytest.raises(ValueError) as e:
        check_support(cfg, ["t_a", "t_b"], "cpu")
    msg = str(e.value)
    assert "'adam'" in msg and "(table t_a)" in msg and f"cpu supports {CPU_LIST}" in msg
    check_support(cfg, ["t_a", "t_b"], "cuda")  # fbgemm has a fused Adam on CUDA
    for ok in (SparseOptimizer.sgd, SparseOptimizer.adagrad, SparseOptimizer.rowwise_adagrad):
        check_support(OptimConfig(sparse=ok), ["t_a"], "cpu")


def test_check_support_names_the_table_whose_override_is_unsupported() -> None:
    cfg = OptimConfig(tables={"t_b": SparseGroupConfig(optimizer=SparseOptimizer.adam)})
    with pytest.raises(ValueError, match=r"'adam' \(table t_b\)"):
        check_support(cfg, ["t_a", "t_b"], "cpu")


def test_validate_experiment_refuses_adam_on_cpu() -> None:
    with pytest.raises(ConfigError) as e:
        _validate("optim.sparse=adam", "train.device=cpu")
    msg = str(e.value)
    assert msg.startswith("optim: fused sparse optimizer 'adam'") and f"cpu supports {CPU_LIST}" in msg
    with pytest.raises(ConfigError, match=r"'adam' \(table t_item_id\)"):
        _validate("optim.tables={t_item_id: {optimizer: adam}}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host has CUDA: train.device=cuda is valid here")
def test_adam_with_cuda_on_a_host_without_cuda_names_the_device() -> None:
    """Adam is fine for CUDA; the error is then that this host has no CUDA."""
    with pytest.raises(ConfigError, match="train.device=cuda but torch sees no CUDA device"):
        _validate("optim.sparse=adam", "train.device=cuda")


def test_cli_adam_on_cpu_exits_2_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", str(DIN_TINY), f"run_dir={run_dir}", "optim.sparse=adam"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("config error: optim: fused sparse optimizer 'adam'") and CPU_LIST in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not run_dir.exists()  # refused before anything is written


# ---------------------------------------------------------------------------------------- per-table settings


def test_table_key_matching_no_table_lists_the_tables() -> None:
    with pytest.raises(ValueError) as e:
        table_settings(OptimConfig(tables={"t_nope": SparseGroupConfig(lr=0.1)}), DIN_TABLES)
    msg = str(e.value)
    assert msg.startswith("optim.tables") and "['t_nope']" in msg and all(f"'{t}'" in msg for t in DIN_TABLES)
    with pytest.raises(ValueError, match=r"\['x_\*'\]"):  # a glob matching nothing, too
        table_settings(OptimConfig(tables={"t_*": SparseGroupConfig(), "x_*": SparseGroupConfig()}), DIN_TABLES)
    with pytest.raises(ConfigError) as ce:
        _validate("optim.tables={t_nope: {lr: 0.1}}")
    msg = str(ce.value)
    assert msg.startswith("optim: optim.tables") and "['t_nope']" in msg and all(f"'{t}'" in msg for t in DIN_TABLES)


def test_exact_name_beats_glob_and_first_glob_wins() -> None:
    cfg = OptimConfig(
        sparse=SparseOptimizer.sgd,
        sparse_lr=0.05,
        tables={
            "t_item*": SparseGroupConfig(lr=0.5),
            "t_item_id": SparseGroupConfig(optimizer=SparseOptimizer.rowwise_adagrad, lr=0.1, eps=1e-6),
            "t_*": SparseGroupConfig(optimizer=SparseOptimizer.adagrad),
            "*_id": SparseGroupConfig(lr=0.3),
        },
    )
    s = table_settings(cfg, ["t_user_id", "t_item_id", "t_item_category", "other"])
    # exact name, although the glob "t_item*" comes first
    assert s["t_item_id"] == SparseGroupConfig(SparseOptimizer.rowwise_adagrad, 0.1, 1e-6)
    # the first glob in config order; unset fields from the optim defaults
    assert s["t_item_category"] == SparseGroupConfig(SparseOptimizer.sgd, 0.5, 1e-8)
    assert s["t_user_id"] == SparseGroupConfig(SparseOptimizer.adagrad, 0.05, 1e-8)  # "t_*", not "*_id"
    assert s["other"] == SparseGroupConfig(SparseOptimizer.sgd, 0.05, 1e-8)  # no key: the defaults
    swapped = OptimConfig(tables={"*_id": SparseGroupConfig(lr=0.3), "t_*": SparseGroupConfig(lr=0.2)})
    assert table_settings(swapped, ["t_user_id"])["t_user_id"].lr == 0.3


def test_yaml_order_of_globs_is_kept_and_settings_reach_the_tables() -> None:
    """From a config override through ``apply_sparse_optimizers`` onto the tables of the meta model."""
    override = 'optim.tables={"*_id": {lr: 0.3}, "t_*": {lr: 0.2, optimizer: rowwise_adagrad}}'
    cfg, spec, _ = load_config(DIN_TINY, [override])
    assert list(cfg.optim.tables) == ["*_id", "t_*"]
    train_module = spec.build_train_module(spec.build(cfg.model, cfg.data.schema, torch.device("meta")), cfg.model)
    settings = apply_sparse_optimizers(train_module, cfg.optim)
    assert {t: (s.optimizer.value, s.lr) for t, s in settings.items()} == {
        "t_user_id": ("adagrad", 0.3), "t_item_id": ("adagrad", 0.3), "t_item_category": ("rowwise_adagrad", 0.2)
    }
    params = table_parameters(train_module)
    assert sorted(params) == DIN_TABLES
    fused = {t: (p._optimizer_classes[0].__name__, p._optimizer_kwargs[0]["lr"]) for t, p in params.items()}
    assert fused == {"t_user_id": ("Adagrad", 0.3), "t_item_id": ("Adagrad", 0.3),
                     "t_item_category": ("RowWiseAdagrad", 0.2)}


# -------------------------------------------------------------------------------------------- dense groups


def test_dense_groups_first_group_wins_prefixes_stripped_default_takes_the_rest() -> None:
    names = ["_dmp_wrapped_module.model.attention.w", "model.mlp.w", "module.model.mlp.b", "model.head.w"]
    cfg = OptimConfig(dense_groups={
        "attn": DenseGroupConfig(params=["model.attention.*"]),
        "mlp": DenseGroupConfig(params=["model.mlp.*", "model.attention.*"]),
    })
    assert dense_groups(names, cfg) == {
        "attn": ["_dmp_wrapped_module.model.attention.w"],
        "mlp": ["model.mlp.w", "module.model.mlp.b"],
        "default": ["model.head.w"],
    }
    assert dense_groups(names, OptimConfig()) == {"default": names}


def test_dense_group_matching_nothing_or_named_default_is_an_error() -> None:
    names = ["model.mlp.w", "model.head.w"]
    with pytest.raises(ValueError) as e:
        dense_groups(names, OptimConfig(dense_groups={"g": DenseGroupConfig(params=["nope.*"])}))
    assert str(e.value) == (
        "optim.dense_groups ['g'] match no dense parameter; parameter names look like ['model.head.w', 'model.mlp.w']"
    )
    with pytest.raises(ValueError, match="'default' is the name of the group of the remaining parameters"):
        dense_groups(names, OptimConfig(dense_groups={"default": DenseGroupConfig(params=["model.*"])}))


def test_validate_experiment_checks_dense_groups_against_the_model() -> None:
    with pytest.raises(ConfigError) as e:
        _validate("optim.dense_groups={g: {params: [nope.*]}}")
    msg = str(e.value)
    assert msg.startswith("optim: optim.dense_groups ['g'] match no dense parameter")
    assert "model.attention." in msg and "t_item_id" not in msg  # dense parameters only, never the tables
    with pytest.raises(ConfigError, match="'default' is the name"):
        _validate("optim.dense_groups={default: {params: [model.*]}}")
    _validate('optim.dense_groups={attn: {params: ["model.attention.*"], lr: 0.01}}')  # DIN has these


def test_replicated_adam_is_accepted_on_every_device_only_for_all_tables() -> None:
    from launch.optim import replicated

    cfg = OptimConfig(sparse=SparseOptimizer.replicated_adam)
    assert replicated(cfg, ["t_a", "t_b"])
    check_support(cfg, ["t_a", "t_b"], "cpu")  # not fused: no fbgemm support needed
    assert not replicated(OptimConfig(), ["t_a"])
    mixed = OptimConfig(sparse=SparseOptimizer.replicated_adam, tables={"t_b": SparseGroupConfig(optimizer=SparseOptimizer.adagrad)})
    with pytest.raises(ValueError, match=r"every table.*\['t_a'\] but not \['t_b'\]"):
        replicated(mixed, ["t_a", "t_b"])
    with pytest.raises(ValueError, match="replicated_adam"):  # the refusal of fused adam points to the way out
        check_support(OptimConfig(sparse=SparseOptimizer.adam), ["t_a"], "cpu")
