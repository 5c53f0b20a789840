"""Zoo entry ``three_tower``: the two towers plus a cross tower over the user-item cross features, whose
scalar output is added to the logit; trained on exposed candidates by default. DUET's model and train module
with other defaults."""

from __future__ import annotations

from dataclasses import dataclass

from models.duet import Arch, PreRankerConfig, Training, preranking_spec
from models.registry import register


@dataclass
class ThreeTowerConfig(PreRankerConfig):
    """:class:`models.duet.PreRankerConfig` with ``arch: three_tower`` and ``training: exposed``."""

    name: str = "three_tower"
    arch: Arch = Arch.three_tower
    training: Training = Training.exposed


SPEC = register(preranking_spec("three_tower", ThreeTowerConfig))
