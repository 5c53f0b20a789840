"""Zoo entry ``duet`` (Xiao et al., DUET: Dual Model Co-Training for Entire Space CTR Prediction): a set-level
pre-ranker (linear candidate-to-sequence and candidate-to-candidate attention) scoring every candidate of a
request in one pass, trained by dual-model co-training. The pre-ranking baselines (``two_tower``,
``three_tower``) and the sample-selection-bias schemes (``model.training``) share this package's model and
train module."""

from __future__ import annotations

from typing import Mapping

from datasets.schema import SchemaConfig, table_name
from models.duet.model import Arch, PreRanker, PreRankerConfig, Training, check_preranking_schema
from models.duet.train import (
    TWO_MODELS,
    PreRankingModel,
    PreRankingTrainModule,
    build_preranking_train_module,
    preranking_tasks,
)
from models.registry import ModelSpec, TableConstraint, large_table_constraint, register

__all__ = [
    "Arch", "PreRanker", "PreRankerConfig", "PreRankingModel", "PreRankingTrainModule", "Training",
    "check_preranking_schema", "preranking_spec",
]


def _constraints(cfg: PreRankerConfig, schema: SchemaConfig) -> Mapping[str, TableConstraint]:
    """The item-id and user tables (the large ones) go row-wise or table-wise (mch tables: row-wise), for every
    sub-model's role."""
    roles = ("a", "b") if cfg.training in TWO_MODELS else (None,)
    big = [cfg.candidate_features[0], *cfg.user_features[:1]]
    out = {}
    for name in big:
        f = schema.id_feature(name)
        for role in roles:
            out[table_name(f.table or f.name, role)] = large_table_constraint(schema, name)
    return out


def _caps(cfg: PreRankerConfig, schema: SchemaConfig) -> Mapping[str, int]:
    return {schema.id_feature(cfg.history_features[0]).group: cfg.history_length}


def preranking_spec(name: str, config_cls: type) -> ModelSpec:
    """The ModelSpec of a pre-ranking entry (``duet``, ``two_tower``, ``three_tower``)."""
    return ModelSpec(
        name=name,
        config_cls=config_cls,
        build=lambda cfg, schema, device: PreRankingModel(cfg, schema, device),
        build_train_module=build_preranking_train_module,
        default_constraints=_constraints,
        sequence_caps=_caps,
        metrics="preranking",
        select_metric="auc",
        tasks=preranking_tasks,
    )


SPEC = register(preranking_spec("duet", PreRankerConfig))
