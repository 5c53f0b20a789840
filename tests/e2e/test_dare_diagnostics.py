"""``python -m launch.dare_diagnostics``: gradient domination / conflict and the attention picture."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from datasets.synthetic import SyntheticParams, generate
import torch

from launch.dare_diagnostics import main, sharpness

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dare_diag")
    generate(out, SyntheticParams(num_samples=512, num_eval_samples=128, num_users=200, num_items=1000,
                                  num_categories=50, max_seq_len=100, files=1, row_group_size=128, seed=0))
    return out


def _run(data, run_dir, *overrides):
    paths = [f"data.train_paths=[{data}/train/*.parquet]", f"data.eval_paths=[{data}/eval/*.parquet]"]
    assert main(["--config", "configs/tests/dare_tiny.yaml", "--run-dir", str(run_dir), "--checkpoint", "init",
                 "--batches", "2", *paths, *overrides]) == 0
    return json.loads((run_dir / "diagnostics" / "diagnostics.json").read_text())


def test_shared_table_gets_both_gradients_dare_tables_keep_them_apart(data, tmp_path):
    shared = _run(data, tmp_path / "twin", "model.tables=1", "model.attn_dim=8")
    assert shared["rows_both"] > 0 and shared["rows_both"] == shared["rows_attention"]
    assert shared["grad_norm_attention"] > 0 and shared["grad_norm_representation"] > 0
    assert 0.0 <= shared["conflict_share"] <= 1.0 and -1.0 <= shared["cosine_mean"] <= 1.0
    dare = _run(data, tmp_path / "dare")
    assert dare["rows_both"] == 0  # no embedding row receives both gradients: no conflict possible
    assert dare["rows_attention"] > 0 and dare["rows_representation"] > 0
    att = dare["attention_vs_truth"]
    assert sum(att["by_category"]["count"]) == sum(att["by_position"]["count"]) > 0
    sharp = att["sharpness"]
    assert sharp["rows"] > 0 and 1.0 <= sharp["effective_survivors"] <= 100 and 0 < sharp["max_weight"] <= 1
    assert sharp["entropy"] == pytest.approx(math.log(sharp["effective_survivors"]), rel=0.2)  # a mean of exps
    png = Image.open(tmp_path / "dare" / "diagnostics" / "attention.png")
    assert png.size == (24 * (12 + 2), 48)
    assert any((tmp_path / "dare" / "diagnostics" / "tb").iterdir())


def test_refuses_other_entries_and_missing_checkpoints(data, tmp_path, capsys):
    assert main(["--config", "configs/tests/twin_tiny.yaml", "--run-dir", str(tmp_path)]) == 2
    assert "dare entry" in capsys.readouterr().err
    assert main(["--config", "configs/tests/dare_tiny.yaml", "--run-dir", str(tmp_path)]) == 2
    assert "no best checkpoint" in capsys.readouterr().err


def test_sharpness_of_known_rows():
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.7], [1.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0],
                            [0.3, 0.3, 0.3, 0.3, 0.3]])
    ok = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    entropy, effective, largest = sharpness(weights, ok)  # the masked 0.7 and the row without survivors drop out
    torch.testing.assert_close(entropy, torch.tensor([math.log(4), 0.0, math.log(2)], dtype=torch.double))
    torch.testing.assert_close(effective, torch.tensor([4.0, 1.0, 2.0], dtype=torch.double))
    torch.testing.assert_close(largest, torch.tensor([0.25, 1.0, 0.5], dtype=torch.double))
