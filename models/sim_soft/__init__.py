"""Zoo entry ``sim_soft``: SIM with soft search (Pi et al. 2020): the GSU ranks behaviours by the inner product
of separately trained embeddings (tables of role ``gsu``, trained by an auxiliary CTR loss only), the ESU is
multi-head target attention. The TWIN model with other defaults."""

from __future__ import annotations

from dataclasses import dataclass

from models.registry import register
from models.twin import ESU, Search, TWINConfig, two_stage_spec


@dataclass
class SIMSoftConfig(TWINConfig):
    """:class:`models.twin.TWINConfig` with ``search: inner_product`` and ``esu: mha``."""

    name: str = "sim_soft"
    search: Search = Search.inner_product
    esu: ESU = ESU.mha


SPEC = register(two_stage_spec("sim_soft", SIMSoftConfig))
