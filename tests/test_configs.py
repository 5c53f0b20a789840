"""Every YAML under configs/ loads strictly and builds its model on the meta device."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from datasets.schema import table_name
from launch.config import ConfigError, ExperimentConfig, _read_yaml, load_config, validate_experiment
from models.registry import all_specs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# The zoo's entries as collected (test entries register later, when a config imports them).
ENTRIES = sorted(all_specs())
# YAMLs that belong to no zoo entry (data sets, test entries' configs): update when adding one. Each entry's
# own YAMLs (models/<name>.yaml, tests/<name>_tiny.yaml, experiments/<name>_*.yaml) are counted from the registry.
EXPECTED_SHARED_COUNT = 11


def _entry_configs(name: str) -> list[Path]:
    experiments = sorted((ROOT / "configs/experiments").glob(f"{name}_*.yaml"))
    return [ROOT / f"configs/models/{name}.yaml", ROOT / f"configs/tests/{name}_tiny.yaml", *experiments]


def test_config_count():
    # The glob must not silently shrink: it finds every YAML file of the tree, each entry's, and the shared ones.
    walked = sorted(Path(d, f) for d, _, files in os.walk(ROOT / "configs") for f in files if f.endswith(".yaml"))
    assert CONFIGS == walked
    owned = {p for name in ENTRIES for p in _entry_configs(name)}
    assert owned <= set(CONFIGS), sorted(str(p.relative_to(ROOT)) for p in owned - set(CONFIGS))
    shared = sorted(str(p.relative_to(ROOT)) for p in set(CONFIGS) - owned)
    assert len(shared) == EXPECTED_SHARED_COUNT, shared


# What python -m datasets.taobao's meta.json holds (its table names), small.
FIXTURE_TABLE_SIZES = {"t_user_id": 101, "t_item_id": 1001, "t_item_category": 51, "t_hist_behavior_type": 5}


# Request-level data (no per-sample labels) is paired with a request-level entry, and request-level entries'
# model YAMLs with the tiny request data.
REQUEST_MODEL, REQUEST_DATA = "duet", "configs/datasets/synthetic_requests_tiny.yaml"


def _as_experiment(path: Path, tmp_path: Path) -> Path:
    """An experiment file for a partial config: datasets get a model, models get the tiny data set."""
    raw = OmegaConf.load(path)
    includes = [str(path)]
    request_data = OmegaConf.select(raw, "data.schema.labels") == []
    if "model" not in raw and "includes" not in raw:
        includes.append(str(ROOT / f"configs/models/{REQUEST_MODEL if request_data else ENTRIES[0]}.yaml"))
    if "data" not in raw and ("includes" not in raw or path.parent.name == "models"):  # a model YAML may include another
        name = OmegaConf.select(raw, "model.name")
        request_model = name is not None and all_specs()[name].metrics == "preranking"
        includes.insert(0, str(ROOT / (REQUEST_DATA if request_model else "configs/datasets/synthetic_tiny.yaml")))
    doc: dict = {"includes": includes}
    merged = _read_yaml(path)
    if OmegaConf.select(merged, "data.meta_path"):
        # Table sizes come from a converter's meta.json that a fresh clone does not have: stand one in, with the
        # tables the schema names (the Taobao converter's fixture sizes where they apply).
        sizes = dict(FIXTURE_TABLE_SIZES)
        for f in OmegaConf.select(merged, "data.schema.id_features") or []:
            sizes.setdefault(table_name(f.get("table") or f["name"]), 1001)
        meta = tmp_path / "meta.json"
        meta.write_text(json.dumps({"table_sizes": sizes}))
        doc["data"] = {"meta_path": str(meta)}
    exp = tmp_path / "exp.yaml"
    exp.write_text(OmegaConf.to_yaml(doc))
    return exp


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_loads_and_builds_on_meta(path, tmp_path):
    cfg, spec, _ = load_config(_as_experiment(path, tmp_path))
    validate_experiment(cfg, spec)
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.model, spec.config_cls)
    model = spec.build(cfg.model, cfg.data.schema, torch.device("meta"))
    train_module = spec.build_train_module(model, cfg.model)
    params = list(train_module.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    from launch.sharding import embedding_tables

    tables = set(embedding_tables(model))  # the model's own table names (roles included)
    assert set(spec.default_constraints(cfg.model, cfg.data.schema)) <= tables


@pytest.mark.parametrize("name", ENTRIES)
def test_every_zoo_entry_has_model_experiment_and_tiny_configs(name):
    model, tiny, *experiments = _entry_configs(name)
    assert model.is_file() and tiny.is_file() and experiments


def test_unknown_keys_fail_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*valid keys: .*max_steps"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"'model.embeding_dim'.*embedding_dim"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["model.embeding_dim=3"])
    with pytest.raises(ConfigError, match=r"unknown model 'nope'"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["model.name=nope"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["train.max_steps"])
    with pytest.raises(ConfigError, match="id_policy"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["data.id_policy=drop"])


def test_errors_that_need_the_model_are_config_errors():
    cfg, spec, _ = load_config(ROOT / "configs/tests/din_tiny.yaml", ["sharding.tables.t_itme.sharding_types=[row_wise]"])
    with pytest.raises(ConfigError, match=r"sharding: .*t_itme.*t_item_id"):
        validate_experiment(cfg, spec)
    cfg, spec, _ = load_config(ROOT / "configs/tests/din_tiny.yaml", ["model.history_features=[hist_item_id,user_id]"])
    with pytest.raises(ConfigError, match=r"model \(din\) does not fit data.schema"):
        validate_experiment(cfg, spec)
    with pytest.raises(ConfigError, match=r"data.schema: .*more than once"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["data.schema.labels=[label,user_id]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.eval_every=-1", "train.eval_every must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.train_paths=[]", "data.train_paths and data.eval_paths"),
    ],
)
def test_range_checks_are_config_errors(override, message):
    cfg, spec, _ = load_config(ROOT / "configs/tests/din_tiny.yaml", [override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_experiment(cfg, spec)


def test_malformed_overrides_are_config_errors():
    with pytest.raises(ConfigError, match="train.device"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["train.device=gpu"])
    with pytest.raises(ConfigError, match="bad override"):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["data.schema.labels=[label"])
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs/tests/din_tiny.yaml", ["data.schema.id_features.4.group=other"])
    cfg, spec, _ = load_config(
        ROOT / "configs/tests/din_tiny.yaml", ["data.schema.labels=[]", "data.schema.sequence_labels=[{name: hist_lab, sequence: true}]"]
    )
    with pytest.raises(ConfigError, match="predicts per-sample labels"):
        validate_experiment(cfg, spec)


def test_overrides_and_swapping_the_model_file(tmp_path):
    cfg, spec, resolved = load_config(ROOT / "configs/tests/din_tiny.yaml", ["train.max_steps=7", "data.id_policy=clip"])
    assert cfg.train.max_steps == 7 and cfg.data.id_policy.value == "clip" and spec.name == "din"
    assert OmegaConf.select(resolved, "train.max_steps") == 7
    swapped = tmp_path / "swap.yaml"
    swapped.write_text((ROOT / "configs/tests/din_tiny.yaml").read_text().replace("models/din.yaml", "models/avgpool.yaml"))
    text = swapped.read_text().replace("../datasets/", str(ROOT / "configs/datasets") + "/").replace("../models/", str(ROOT / "configs/models") + "/")
    swapped.write_text(text)
    cfg2, spec2, _ = load_config(swapped)
    assert spec2.name == "avgpool" and type(cfg2.model).__name__ != type(cfg.model).__name__
