"""Fixtures of the data-layer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture
def write_parquet(tmp_path: Path) -> Callable[..., str]:
    """Writes a table to ``tmp_path/name`` with ``row_group_size`` rows per row group; returns the path."""

    def write(table: pa.Table, name: str = "part-0.parquet", row_group_size: Optional[int] = None) -> str:
        path = tmp_path / name
        pq.write_table(table, path, row_group_size=row_group_size or max(table.num_rows, 1))
        return str(path)

    return write
