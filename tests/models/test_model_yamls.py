"""configs/models/*.yaml load strictly into their entry's config dataclass and build on meta."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from models.registry import all_specs
from tests.models.batch_helpers import tiny_schema

YAMLS = sorted(Path("configs/models").glob("*.yaml"))


def _load(path: Path):
    section = OmegaConf.load(path).model
    spec = all_specs()[section.name]
    merged = OmegaConf.merge(OmegaConf.structured(spec.config_cls), section)
    return spec, OmegaConf.to_object(merged)


def test_every_entry_has_a_model_yaml():
    assert len(YAMLS) >= 2
    assert {p.stem for p in YAMLS} >= {"din", "avgpool"}
    for name, spec in all_specs().items():
        assert spec.config_cls().name == name


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_model_yaml_loads_strictly_and_builds_on_meta(path: Path):
    spec, cfg = _load(path)
    assert spec.name == path.stem and isinstance(cfg, spec.config_cls)
    model = spec.build(cfg, tiny_schema(), torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(spec.config_cls), {"no_such_field": 1})
