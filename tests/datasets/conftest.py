"""Fixtures of the data-layer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

#: The project's shared folder beside the repository: real data samples (never copied into the repo).
SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def shared_file(relative: str) -> Path:
    """Path of ``../shared/<relative>``; skips the test where ``../shared`` is absent (a user's own clone).

    Where ``../shared`` exists the file must too: a missing file there fails, it never skips.
    """
    if not SHARED.is_dir():
        pytest.skip(f"needs {SHARED / relative}: {SHARED} is absent (the shared folder beside the repo)")
    path = SHARED / relative
    assert path.is_file(), f"{path} is missing although {SHARED} exists"
    return path


@pytest.fixture(scope="session")
def taobao_sample() -> Path:
    """The real Taobao UserBehavior slice ``../shared/data/taobao_userbehavior_sample.csv``."""
    return shared_file("data/taobao_userbehavior_sample.csv")


@pytest.fixture(scope="session")
def taobao_like_tool() -> Path:
    """``../shared/tools/taobao_like.py``, the generator of synthetic UserBehavior-format logs."""
    return shared_file("tools/taobao_like.py")


@pytest.fixture
def write_parquet(tmp_path: Path) -> Callable[..., str]:
    """Writes a table to ``tmp_path/name`` with ``row_group_size`` rows per row group; returns the path."""

    def write(table: pa.Table, name: str = "part-0.parquet", row_group_size: Optional[int] = None) -> str:
        path = tmp_path / name
        pq.write_table(table, path, row_group_size=row_group_size or max(table.num_rows, 1))
        return str(path)

    return write
