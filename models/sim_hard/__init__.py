"""Zoo entry ``sim_hard``: SIM with hard search (Pi et al. 2020): the GSU keeps the behaviours of the target's
category (most recent first), the ESU is multi-head target attention. The TWIN model with other defaults."""

from __future__ import annotations

from dataclasses import dataclass

from models.registry import register
from models.twin import ESU, Search, TWINConfig, two_stage_spec


@dataclass
class SIMHardConfig(TWINConfig):
    """:class:`models.twin.TWINConfig` with ``search: hard`` and ``esu: mha``."""

    name: str = "sim_hard"
    search: Search = Search.hard
    esu: ESU = ESU.mha


SPEC = register(two_stage_spec("sim_hard", SIMHardConfig))
