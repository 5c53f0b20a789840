"""Zoo entries. Each entry is imported here explicitly and registers its ModelSpec."""

from models import avgpool, dare, din, sim_hard, sim_soft, twin  # noqa: F401
