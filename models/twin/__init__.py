"""Zoo entry ``twin``: TWo-stage Interest Network (Chang et al. 2023); ``search: hard`` is TWIN-hard."""

from __future__ import annotations

from typing import Any, Mapping

from datasets.schema import SchemaConfig
from models.common import item_and_user_constraints
from models.registry import ModelSpec, TableConstraint, register
from models.twin.model import ESU, Search, TWINConfig, TwoStage
from models.twin.train import TwoStageTrainModule, build_two_stage_train_module


def two_stage_caps(cfg: TWINConfig, schema: SchemaConfig) -> Mapping[str, int]:
    """The reader keeps the most recent ``long_history`` behaviours (0: all it reads)."""
    if cfg.long_history <= 0:
        return {}
    return {schema.id_feature(cfg.history_features[0]).group: cfg.long_history}


def two_stage_constraints(cfg: TWINConfig, schema: SchemaConfig) -> Mapping[str, TableConstraint]:
    return item_and_user_constraints(schema, cfg.user_feature, cfg.target_features)


def two_stage_spec(name: str, config_cls: type) -> ModelSpec:
    """The ModelSpec of a two-stage entry (``twin``, ``sim_hard``, ``sim_soft``: one model, other defaults)."""
    return ModelSpec(
        name=name,
        config_cls=config_cls,
        build=lambda cfg, schema, device: TwoStage(cfg, schema, device),
        build_train_module=build_two_stage_train_module,
        default_constraints=two_stage_constraints,
        sequence_caps=two_stage_caps,
    )


SPEC = register(two_stage_spec("twin", TWINConfig))

__all__ = ["ESU", "SPEC", "Search", "TWINConfig", "TwoStage", "TwoStageTrainModule", "two_stage_spec"]
