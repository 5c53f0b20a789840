"""The process runner itself: results by rank, a child's exception with its traceback, the timeout."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist.runner import WorkerError, run_workers

pytestmark = pytest.mark.dist


def _sum_ranks(rank: int, world_size: int, offset: int) -> int:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return int(t) * 10 + rank


def _rank1_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes


def _sleeps(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_results_by_rank() -> None:
    assert run_workers(_sum_ranks, world_size=2, args=(5,)) == [110, 111]


def test_child_exception_fails_with_its_traceback() -> None:
    with pytest.raises(WorkerError, match=r"(?s)^rank 1 raised:\nTraceback.*_rank1_raises.*ValueError: boom on rank 1"):
        run_workers(_rank1_raises, world_size=2, timeout_s=60)


def test_timeout_kills_the_workers() -> None:
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not finish within 3s"):
        run_workers(_sleeps, world_size=2, timeout_s=3)
    assert time.monotonic() - t0 < 30
