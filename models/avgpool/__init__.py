"""Zoo entry ``avgpool``: the last-N average-pooling baseline."""

from models.avgpool.model import AvgPoolConfig, AvgPoolLastN
from models.base import build_ctr_train_module
from models.common import history_caps, item_and_user_constraints
from models.registry import ModelSpec, register

SPEC = register(
    ModelSpec(
        name="avgpool",
        config_cls=AvgPoolConfig,
        build=lambda cfg, schema, device: AvgPoolLastN(cfg, schema, device),
        build_train_module=build_ctr_train_module,
        default_constraints=lambda cfg, schema: item_and_user_constraints(
            schema, cfg.user_feature, cfg.target_features
        ),
        sequence_caps=lambda cfg, schema: history_caps(schema, cfg.history_features, cfg.history_length),
    )
)

__all__ = ["AvgPoolConfig", "AvgPoolLastN", "SPEC"]
