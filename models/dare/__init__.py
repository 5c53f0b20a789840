"""Zoo entry ``dare``: decoupled attention and representation embeddings (Feng et al. 2025), and the TWIN
baselines of its Table 1 as config variants (``model.tables``, ``projection``, ``target_aware``, ``search``)."""

from __future__ import annotations

from typing import Mapping

from datasets.schema import SchemaConfig, table_name
from models.dare.model import DARE, DAREConfig, DareSearch
from models.registry import ModelSpec, TableConstraint, large_table_constraint, register
from models.twin import two_stage_caps
from models.twin.train import build_two_stage_train_module


def dare_constraints(cfg: DAREConfig, schema: SchemaConfig) -> Mapping[str, TableConstraint]:
    """The item-id tables (every role) and the user table go row-wise or table-wise (mch tables: row-wise);
    the planner picks."""
    item = schema.id_feature(cfg.target_features[0])
    base = item.table or item.name
    roles = {1: [None], 2: ["attn", "repr"], 4: ["attn", "repr", "attn_target", "repr_target"]}[cfg.tables]
    out = {table_name(base, role): large_table_constraint(schema, item.name) for role in roles}
    if cfg.user_feature:
        out[schema.id_feature(cfg.user_feature).table_name] = large_table_constraint(schema, cfg.user_feature)
    return out


SPEC = register(
    ModelSpec(
        name="dare",
        config_cls=DAREConfig,
        build=lambda cfg, schema, device: DARE(cfg, schema, device),
        build_train_module=build_two_stage_train_module,
        default_constraints=dare_constraints,
        sequence_caps=two_stage_caps,
    )
)

__all__ = ["DARE", "DAREConfig", "DareSearch", "SPEC"]
