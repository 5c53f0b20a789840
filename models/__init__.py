"""Zoo entries. Each entry is imported here explicitly and registers its ModelSpec."""

from models import avgpool, dare, din, duet, sim_hard, sim_soft, three_tower, twin, two_tower  # noqa: F401
