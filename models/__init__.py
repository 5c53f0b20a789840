"""Zoo entries. Each entry is imported here explicitly and registers its ModelSpec."""

from models import avgpool, din  # noqa: F401
