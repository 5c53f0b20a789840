"""Sharded (2 gloo ranks) vs unsharded parity of the reference model after one SGD step, per sharding type."""

from __future__ import annotations

import pytest

from tests.dist.parity import ParityCase, check_sharding_parity
from tests.dist.reference_model import build_reference_train_module, make_reference_batch
from tests.dist.runner import run_workers

pytestmark = pytest.mark.dist

REFERENCE = ParityCase(build_reference_train_module, make_reference_batch)


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise", "row_wise"])
def test_reference_model_parity(sharding_type: str) -> None:
    results = run_workers(check_sharding_parity, world_size=2, args=(REFERENCE, sharding_type))
    assert results[0]["loss"] == results[1]["loss"]
