"""Zoo entry ``two_tower``: the pointwise two-tower pre-ranker, ``<tower_u([user, mean history]),
tower_i(candidate)>``, trained on exposed candidates by default (``model.training``: ``ips``, ``dr_jl``, ``ukd``
give the sample-selection-bias baselines on the same towers). DUET's model and train module with other
defaults."""

from __future__ import annotations

from dataclasses import dataclass

from models.duet import Arch, PreRankerConfig, Training, preranking_spec
from models.registry import register


@dataclass
class TwoTowerConfig(PreRankerConfig):
    """:class:`models.duet.PreRankerConfig` with ``arch: two_tower`` and ``training: exposed``."""

    name: str = "two_tower"
    arch: Arch = Arch.two_tower
    training: Training = Training.exposed


SPEC = register(preranking_spec("two_tower", TwoTowerConfig))
