"""configs/models/*.yaml load strictly into their entry's config dataclass and build on meta."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from datasets.canonical import canonical_schema
from launch.config import load_config
from models.registry import all_specs

YAMLS = sorted(Path("configs/models").glob("*.yaml"))


def _load(path: Path):
    section = OmegaConf.load(path).model
    spec = all_specs()[section.name]
    merged = OmegaConf.merge(OmegaConf.structured(spec.config_cls), section)
    return spec, OmegaConf.to_object(merged)


ENTRIES = sorted(all_specs())  # the zoo's entries, as collected (before any config imports test entries)


def test_every_entry_has_a_model_yaml():
    assert len(ENTRIES) >= 2
    assert sorted(p.stem for p in YAMLS) == ENTRIES  # one model YAML per entry, and no YAML without its entry
    for name in ENTRIES:
        assert all_specs()[name].config_cls().name == name


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_model_yaml_loads_strictly_and_builds_on_meta(path: Path):
    spec, cfg = _load(path)
    assert spec.name == path.stem and isinstance(cfg, spec.config_cls)
    # The canonical schema (behaviour type, time delta and relevance included): what every per-sample entry's
    # YAML names; the request-level pre-rankers read the request schema of the synthetic request data.
    if spec.metrics == "preranking":
        schema = load_config(Path("configs/tests/duet_tiny.yaml"))[0].data.schema
    else:
        schema = canonical_schema(40, 60, 8, with_relevance=True)
    model = spec.build(cfg, schema, torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(spec.config_cls), {"no_such_field": 1})
