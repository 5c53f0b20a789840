"""Bad inputs to ``python -m launch.train``: each one is one clear line on stderr and the documented exit code
(2 config, 3 data), never a traceback, and nothing is trained first.

Every case runs through :func:`launch.train.main` in this process (stderr captured; a traceback would fail the
test as an exception); a handful run as real processes too (the exit status of the process, the whole stderr
with torch's own output, one line, no ``Traceback``). Classes: the sharding plan file, the device, the run
directory and the files the run writes there, the ``checkpoints/latest`` pointer and the checkpoint it names,
the best-checkpoint metric, optimizers, evaluation options, the data files (train / eval / test), the meta.json
of table sizes, exact epochs, config keys and values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import torch

from launch import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/tests/din_tiny.yaml"
pytestmark = pytest.mark.e2e


@dataclass
class Ctx:
    """What a case builds on: its own folder, the tiny data, and a finished 1-rank run (2 steps)."""

    tmp: Path
    data: Path
    done: Path

    def data_overrides(self) -> list[str]:
        return [f"data.train_paths=[{self.data}/train/*.parquet]", f"data.eval_paths=[{self.data}/eval/*.parquet]"]

    def args(self, *overrides: str, run_dir: Path | None = None) -> list[str]:
        return ["--config", CONFIG, f"run_dir={run_dir or self.tmp / 'run'}", "train.max_steps=2",
                *self.data_overrides(), *overrides]

    def copy_done(self) -> Path:
        """A copy of the finished run's directory (its checkpoint step_00000002 complete)."""
        dst = self.tmp / "run"
        shutil.copytree(self.done, dst)
        return dst

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return p


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from datasets.synthetic import SyntheticParams, generate

    out = tmp_path_factory.mktemp("synthetic_bad_inputs")
    generate(out, SyntheticParams(num_samples=512, num_eval_samples=128, num_users=200, num_items=1000,
                                  num_categories=50, max_seq_len=100, files=1, row_group_size=256, seed=0))
    return out


@pytest.fixture(scope="module")
def done(data: Path, tmp_path_factory) -> Path:
    """A finished 1-rank run: checkpoints/step_00000002 (complete), plan.json."""
    run_dir = tmp_path_factory.mktemp("done") / "run"
    ctx = Ctx(run_dir.parent, data, run_dir)
    rc = _main_isolated(ctx.args(run_dir=run_dir))
    assert rc == 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    return run_dir


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _main_isolated(argv: list[str]) -> int:
    """``launch.train.main`` as a plain single-process run; the process-group variables it sets are undone."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    for k in _DIST_ENV:
        os.environ.pop(k, None)
    try:
        return train.main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------- the cases


def _plan_edit(edit: Callable[[dict], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        plan = json.loads((c.done / "plan.json").read_text())
        edit(plan)
        return c.args(f"sharding.plan_path={c.file('plan.json', json.dumps(plan))}")

    return setup


def _to_rank_1(plan: dict) -> None:
    t = plan["model.embedding.ec"]["t_user_id"]
    t["ranks"] = [1]
    t["shards"][0]["placement"] = "rank:1/cpu"


def _short_shard(plan: dict) -> None:
    plan["model.embedding.ec"]["t_user_id"]["shards"][0]["shard_sizes"][0] -= 1


def _latest(text: str | bytes) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        run_dir = c.copy_done()
        p = run_dir / "checkpoints" / "latest"
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return c.args(run_dir=run_dir)

    return setup


def _without(name: str, replacement: str | None = None) -> Callable[[Ctx], list[str]]:
    """The finished run with one file of its checkpoint removed (or replaced)."""

    def setup(c: Ctx) -> list[str]:
        run_dir = c.copy_done()
        p = run_dir / "checkpoints" / "step_00000002" / name
        p.unlink()
        if replacement is not None:
            p.write_text(replacement)
        return c.args("train.max_steps=4", run_dir=run_dir)

    return setup


def _latest_dir(c: Ctx) -> list[str]:
    run_dir = c.copy_done()
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "latest").mkdir()
    return c.args(run_dir=run_dir)


def _run_dir_entry(name: str, as_dir: bool) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        run_dir = c.tmp / "run"
        run_dir.mkdir()
        (run_dir / name).mkdir() if as_dir else (run_dir / name).write_text("x")
        return c.args(run_dir=run_dir)

    return setup


def _meta(edit: Callable[[dict], None]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        meta = json.loads((c.data / "meta.json").read_text())
        edit(meta)
        return c.args(f"data.meta_path={c.file('meta.json', json.dumps(meta))}")

    return setup


def _test_file_without_column(c: Ctx) -> list[str]:
    table = pq.read_table(next((c.data / "eval").glob("*.parquet")))
    pq.write_table(table.drop_columns(["item_id"]), c.tmp / "test.parquet")
    return c.args(f"data.test_paths=[{c.tmp / 'test.parquet'}]")


def _train_without_column(c: Ctx) -> list[str]:
    table = pq.read_table(next((c.data / "train").glob("*.parquet")))
    pq.write_table(table.drop_columns(["hist_category"]), c.tmp / "train.parquet")
    return c.args(f"data.train_paths=[{c.tmp / 'train.parquet'}]")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: train.device=cuda is valid")

# id -> (setup, exit code, fragments of the one line)
CASES: dict[str, tuple[Callable[[Ctx], list[str]], int, list[str]]] = {
    # the sharding plan file
    "plan_missing": (lambda c: c.args(f"sharding.plan_path={c.tmp / 'nope.json'}"), 2,
                     ["config error: sharding.plan_path", "nope.json: no such file"]),
    "plan_is_a_directory": (lambda c: c.args(f"sharding.plan_path={c.tmp}"), 2, ["no such file"]),
    "plan_not_json": (lambda c: c.args(f"sharding.plan_path={c.file('p.json', 'not json {')}"), 2,
                      ["not a readable plan JSON"]),
    "plan_not_utf8": (lambda c: c.args(f"sharding.plan_path={c.file('p.json', bytes([0xFF, 0xFE, 0x00]))}"), 2,
                      ["not a readable plan JSON"]),
    "plan_a_list": (lambda c: c.args(f"sharding.plan_path={c.file('p.json', '[1, 2]')}"), 2,
                    ["not a plan.json written by an earlier run", "expected an object: module path -> {table:"]),
    "plan_tables_not_objects": (
        lambda c: c.args("sharding.plan_path="
                         + str(c.file("p.json", json.dumps({"model.embedding.ec": {"t_item_id": 5}})))),
        2, ["not a plan.json written by an earlier run"]),
    "plan_entry_missing_key": (
        lambda c: c.args("sharding.plan_path="
                         + str(c.file("p.json", json.dumps({"m": {"t_item_id": {"sharding_type": "row_wise"}}})))),
        2, ["not a plan.json written by an earlier run", "m.t_item_id: missing 'compute_kernel'"]),
    "plan_of_another_world": (_plan_edit(_to_rank_1), 2,
                              ["config error: sharding:", "does not fit the model: t_user_id: ranks [1] outside world"
                               " size 1"]),
    "plan_not_tiling_a_table": (_plan_edit(_short_shard), 2,
                                ["does not fit the model: t_user_id: shards cover 1600 elements, the table has"
                                 " 201 x 8"]),
    # the device
    "cuda_without_cuda": (lambda c: c.args("train.device=cuda"), 2,
                          ["train.device=cuda but torch sees no CUDA device on this host"]),
    # the run directory
    "run_dir_is_a_file": (lambda c: c.args(run_dir=c.file("afile", "x")), 2, ["exists and is not a directory"]),
    "run_dir_under_a_file": (lambda c: c.args(run_dir=c.file("afile", "x") / "sub"), 2,
                             ["cannot be created:", "afile is not a directory"]),
    "checkpoints_is_a_file": (_run_dir_entry("checkpoints", False), 2, ["checkpoints exists and is not a directory"]),
    "best_is_a_file": (_run_dir_entry("best", False), 2, ["best exists and is not a directory"]),
    "tb_is_a_file": (_run_dir_entry("tb", False), 2, ["tb exists and is not a directory"]),
    "metrics_json_is_a_directory": (_run_dir_entry("metrics.json", True), 2, ["metrics.json exists and is not a file"]),
    # checkpoints/latest and the checkpoint it names
    "latest_names_a_dir_without_meta": (_without("meta.json"), 2,
                                        ["names 'step_00000002', which is not a complete checkpoint (no "
                                         "step_00000002/meta.json)"]),
    "latest_names_a_dir_without_dcp_metadata": (_without(".metadata"), 2,
                                                ["not a complete checkpoint (no step_00000002/.metadata)"]),
    "checkpoint_meta_not_json": (_without("meta.json", "garbage"), 2,
                                 ["meta.json: not a valid checkpoint description"]),
    "checkpoint_meta_wrong_keys": (_without("meta.json", '{"steps": 2}'), 2, ["not a valid checkpoint description"]),
    "latest_garbage_bytes": (_latest(bytes([0x00, 0xFF, 0xFE, 0x80])), 2, ["checkpoints/latest: cannot be read"]),
    "latest_names_nothing": (_latest("step_99999999\n"), 2, ["names 'step_99999999', which is not a complete"]),
    "latest_empty": (_latest(""), 2, ["names '', which is not a complete checkpoint"]),
    "latest_is_a_directory": (_latest_dir, 2, ["checkpoints/latest is not a file"]),
    "resume_false_with_checkpoints": (lambda c: c.args("train.resume=false", run_dir=c.copy_done()), 2,
                                      ["already holds checkpoints (latest: step_00000002) and train.resume=false"]),
    "resume_on_another_stream": (lambda c: c.args("data.batch_size=32", "train.max_steps=4", run_dir=c.copy_done()),
                                 2, ["different data stream (batch_size: checkpoint 64, now 32)"]),
    # the best-checkpoint metric
    "best_metric_unknown": (lambda c: c.args("eval.best_metric=foo"), 2,
                            ["eval.best_metric 'foo' is not computed by the 'ctr' metric set of model (din)",
                             "'auc', 'auc/label'"]),
    "best_metric_of_another_set": (lambda c: c.args("eval.best_metric=recall@5"), 2,
                                   ["'recall@5' is not computed"]),
    "best_mode_unknown": (lambda c: c.args("eval.best_mode=up"), 2, ["eval.best_mode must be auto, max or min"]),
    # optimizers
    "adam_on_cpu": (lambda c: c.args("optim.sparse=adam"), 2,
                    ["fused sparse optimizer 'adam'", "cpu supports ['sgd', 'adagrad', 'rowwise_adagrad']"]),
    "adam_for_one_table_on_cpu": (lambda c: c.args("optim.tables={t_item_id: {optimizer: adam}}"), 2,
                                  ["'adam' (table t_item_id)"]),
    "optim_table_unknown": (lambda c: c.args("optim.tables={t_nope: {lr: 0.1}}"), 2,
                            ["optim: optim.tables", "['t_nope']", "'t_item_category'", "'t_item_id'", "'t_user_id'"]),
    "dense_group_matching_nothing": (lambda c: c.args("optim.dense_groups={g: {params: [nope.*]}}"), 2,
                                     ["optim.dense_groups ['g'] match no dense parameter"]),
    "dense_group_named_default": (lambda c: c.args("optim.dense_groups={default: {params: [model.*]}}"), 2,
                                  ["'default' is the name of the group of the remaining parameters"]),
    "sparse_optimizer_unknown": (lambda c: c.args("optim.sparse=lamb"), 2,
                                 ["'optim.sparse': Invalid value 'lamb', expected one of [sgd, adagrad"]),
    # evaluation options and the training loop
    "evals_per_epoch_without_epochs": (lambda c: c.args("train.evals_per_epoch=2"), 2,
                                       ["train.evals_per_epoch needs train.epochs > 0"]),
    "ks_negative": (lambda c: c.args("eval.ks=[-1]"), 2, ["eval.ks: metric ks must be distinct positive integers"]),
    "ks_empty": (lambda c: c.args("eval.ks=[]"), 2, ["eval.ks:", "got []"]),
    "ks_repeated": (lambda c: c.args("eval.ks=[5,5]"), 2, ["eval.ks:", "got [5, 5]"]),
    "ks_zero": (lambda c: c.args("eval.ks=[0,1]"), 2, ["eval.ks:", "got [0, 1]"]),
    "epochs_negative": (lambda c: c.args("train.epochs=-1"), 2, ["train.epochs must be >= 0, got -1"]),
    "eval_every_negative": (lambda c: c.args("train.eval_every=-3"), 2, ["train.eval_every must be >= 0, got -3"]),
    "batch_size_zero": (lambda c: c.args("data.batch_size=0"), 2, ["data.batch_size must be >= 1, got 0"]),
    # config keys and values
    "unknown_key": (lambda c: c.args("train.foo=1"), 2, ["unknown config key 'train.foo'", "valid keys:", "epochs"]),
    "value_of_the_wrong_type": (lambda c: c.args("train.max_steps=abc"), 2,
                                ["invalid config value at 'train.max_steps': Value 'abc' of type 'str' could not be"]),
    "unknown_model": (lambda c: c.args("model.name=nope"), 2, ["unknown model 'nope'"]),
    "config_file_missing": (lambda c: ["--config", str(c.tmp / "nope.yaml")], 2, ["config file not found"]),
    # the meta.json of table sizes
    "meta_path_missing": (lambda c: c.args(f"data.meta_path={c.tmp / 'meta.json'}"), 2,
                          ["data.meta_path:", "meta.json does not exist"]),
    "meta_path_not_json": (lambda c: c.args(f"data.meta_path={c.file('meta.json', '{nope')}"), 2, ["is not JSON"]),
    "meta_path_without_a_table": (_meta(lambda m: m["table_sizes"].pop("t_item_id")), 2,
                                  ["table t_item_id is not in the table_sizes of"]),
    "meta_path_disagrees_with_yaml": (_meta(lambda m: m["table_sizes"].update(t_user_id=999)), 2,
                                      ["t_user_id", "999", "201"]),
    # the data files
    "train_paths_match_nothing": (lambda c: c.args(f"data.train_paths=[{c.tmp}/nope/*.parquet]"), 3,
                                  ["data error:", "nope/*.parquet: the pattern matches no file"]),
    "train_file_missing": (lambda c: c.args(f"data.train_paths=[{c.tmp}/nope.parquet]"), 3,
                           ["data error:", "nope.parquet: cannot open as a parquet file"]),
    "train_file_missing_a_column": (_train_without_column, 3, ["data error:", "hist_category"]),
    "eval_paths_match_nothing": (lambda c: c.args(f"data.eval_paths=[{c.tmp}/nope/*.parquet]"), 3,
                                 ["the pattern matches no file"]),
    "test_paths_match_nothing": (lambda c: c.args(f"data.test_paths=[{c.tmp}/nope/*.parquet]"), 3,
                                 ["data error:", "the pattern matches no file"]),
    "test_file_not_parquet": (lambda c: c.args(f"data.test_paths=[{c.file('t.parquet', 'garbage')}]"), 3,
                              ["t.parquet: cannot open as a parquet file"]),
    "test_file_missing_a_column": (_test_file_without_column, 3, ["data error:", "test.parquet", "item_id"]),
    "exact_epochs_without_a_step": (lambda c: c.args("train.epochs=1", "data.drop_last=true", "data.batch_size=1000"),
                                    3, ["512 rows give no step per epoch", "1 x 1000 and data.drop_last=true"]),
}
MARKS = {"cuda_without_cuda": [NO_CUDA]}
# Run as real processes too (one per class).
IN_A_PROCESS = ["plan_a_list", "cuda_without_cuda", "run_dir_under_a_file", "latest_names_a_dir_without_dcp_metadata",
                "best_metric_unknown", "adam_on_cpu", "test_paths_match_nothing", "exact_epochs_without_a_step"]


def _ctx(name: str, data: Path, done: Path, tmp_path: Path) -> Ctx:
    c = Ctx(tmp_path / name, data, done)
    c.tmp.mkdir()
    return c


def _check_line(name: str, line: str, code: int) -> None:
    _, _, fragments = CASES[name]
    prefix = "config error: " if code == 2 else "data error: "
    assert prefix in line, line
    for f in fragments:
        assert f in line, (f, line)


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, [])) for n in CASES])
def test_bad_input_is_one_line_and_its_exit_code(name: str, data: Path, done: Path, tmp_path: Path, capsys) -> None:
    setup, code, _ = CASES[name]
    c = _ctx(name, data, done, tmp_path)
    argv = setup(c)
    before = {str(p) for p in c.tmp.rglob("*")}
    capsys.readouterr()
    rc = _main_isolated(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    _check_line(name, lines[0], code)
    assert out == ""  # no metrics: nothing ran to the end
    # Nothing was trained: no checkpoint, events or metrics; at most the run directory with its config.yaml.
    new = sorted(str(p.relative_to(c.tmp)) for p in c.tmp.rglob("*") if str(p) not in before)
    assert set(new) <= {"run", "run/config.yaml"}, new


def test_bad_inputs_in_real_processes(data: Path, done: Path, tmp_path: Path) -> None:
    """The process's exit status and its whole stderr (torch's output included): one line, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in _DIST_ENV:
        env.pop(k, None)
    names = [n for n in IN_A_PROCESS if not (n == "cuda_without_cuda" and torch.cuda.is_available())]
    procs = {}
    pending = list(names)
    results: dict[str, tuple[int, str, str]] = {}
    while pending or procs:  # two at a time
        while pending and len(procs) < 2:
            n = pending.pop(0)
            argv = CASES[n][0](_ctx(n, data, done, tmp_path))
            procs[n] = subprocess.Popen([sys.executable, "-m", "launch.train", *argv], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        n = next(iter(procs))
        out, err = procs[n].communicate(timeout=300)
        results[n] = (procs.pop(n).returncode, out, err)
    for n in names:
        rc, out, err = results[n]
        code = CASES[n][1]
        assert rc == code, (n, rc, err[-3000:])
        assert "Traceback" not in err, (n, err[-3000:])
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (n, err[-3000:])
        _check_line(n, lines[0], code)
        assert out == "", (n, out)
