"""A tiny DIN run (2 gloo processes, synthetic parquet, 20 steps) with ``mapping: mch`` on the item table.

The item table is a 257-row ZCH for the ~1000 synthetic items, so ids compete for rows all run long. Checks:
the run trains (loss finite and falling, AUC above chance) and writes its metrics; the plan shards the ZCH
table row-wise; the checkpoint holds the ZCH buffers; and a run stopped at step 10 and resumed ends with
the metrics of an uninterrupted run that also evaluated at steps 5 and 15: the ZCH state is restored
exactly, and evaluation does not change it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_tiny_runs import _data_overrides, _losses, _torchrun, tiny_data  # noqa: F401  (fixture)
from tests.modules.test_mch import mch_din_yaml

pytestmark = pytest.mark.e2e


def test_din_with_mch_items_trains_checkpoints_and_resumes(tiny_data, tmp_path):  # noqa: F811
    config = tmp_path / "din_mch.yaml"
    config.write_text(mch_din_yaml(item_rows=257))
    common = _data_overrides(tiny_data) + ["train.log_every=1"]
    full_dir = tmp_path / "full"
    full = _torchrun(str(config), full_dir, common + ["train.eval_every=5"])
    assert full == json.loads((full_dir / "metrics.json").read_text())
    assert full["model"] == "din" and full["steps"] == 20 and full["world_size"] == 2
    assert full["eval"]["eval_samples"] == 1024
    losses = _losses(full_dir)
    assert len(losses) == 20 and all(l == l and abs(l) < 1e3 for l in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert 0.5 < full["auc"] <= 1.0
    plan = json.loads((full_dir / "plan.json").read_text())
    item_plan = {t: p for module in plan.values() for t, p in module.items()}["t_item_id"]
    assert "row_wise" in json.dumps(item_plan), item_plan

    from torch.distributed.checkpoint import FileSystemReader

    ckpt = full_dir / "checkpoints" / (full_dir / "checkpoints" / "latest").read_text().strip()
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    zch = [k for k in keys if "_managed_collision_modules.t_item_id._mch_" in k]
    assert {k.rsplit(".", 1)[1] for k in zch} >= {"_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts",
                                                   "_mch_last_access_iter"}, zch

    part = tmp_path / "part"
    first = _torchrun(str(config), part, common + ["train.max_steps=10"])
    assert first["steps"] == 10
    resumed = _torchrun(str(config), part, common)
    assert resumed["steps"] == 20 and resumed["steps_this_run"] == 10
    for key in ("auc", "gauc", "logloss", "final_train_loss"):
        assert abs(resumed[key] - full[key]) < 1e-6, (key, resumed[key], full[key])
    assert first["auc"] != full["auc"]  # the comparison is not vacuous
