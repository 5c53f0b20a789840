"""Test-only entries (not zoo entries): each module registers its ModelSpec on import; configs name it in
``imports:`` (configs/tests/request_tiny.yaml, configs/tests/cotrain_tiny.yaml)."""
