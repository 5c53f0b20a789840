"""Sharded (2 gloo ranks) vs unsharded parity of the reference model after one SGD step, per sharding type."""

from __future__ import annotations

import functools

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


def _din_train_module(device):
    from models.base import CTRTrainModule
    from models.din.model import DIN, DINConfig
    from tests.models.batch_helpers import tiny_schema

    cfg = DINConfig(embedding_dim=8, history_length=4, attention_hidden=[8], mlp_hidden=[8])
    return CTRTrainModule(DIN(cfg, tiny_schema(), device))


def _din_batch(rank: int, world_size: int):
    import torch

    from tests.models.batch_helpers import make_batch, random_rows, tiny_schema

    gen = torch.Generator().manual_seed(7)
    global_b = 8
    scalars, sequences = random_rows(gen, global_b, max_len=6, min_len=1)
    labels = torch.randint(0, 2, (global_b, 1), generator=gen)
    b = global_b // world_size
    rows = slice(rank * b, (rank + 1) * b)
    return make_batch(
        tiny_schema(),
        {k: v[rows] for k, v in scalars.items()},
        {k: v[rows] for k, v in sequences.items()},
        labels[rows],
    )


DIN_CASE = ParityCase(_din_train_module, _din_batch)


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise", "row_wise"])
def test_din_parity(sharding_type: str) -> None:
    """The DIN zoo entry, sharded on 2 ranks, matches its unsharded self after one step."""
    results = run_workers(check_sharding_parity, world_size=2, args=(DIN_CASE, sharding_type))
    assert results[0]["loss"] == results[1]["loss"]


def _twin_train_module(device):
    from dataclasses import replace
    from pathlib import Path

    from launch.config import load_config

    cfg, spec, _ = load_config(Path(__file__).resolve().parents[2] / "configs/tests/twin_tiny.yaml")
    # No batch norm: each rank normalises its own share of the batch, the reference the whole batch.
    model_cfg = replace(cfg.model, mlp_batch_norm=False, top_k=4, short_history=3)
    return spec.build_train_module(spec.build(model_cfg, cfg.data.schema, device), model_cfg)


def _twin_batch(rank: int, world_size: int):
    from pathlib import Path

    import numpy as np

    from launch.config import load_config
    from tests.models.batch_helpers import columns_to_batch, random_columns

    schema = load_config(Path(__file__).resolve().parents[2] / "configs/tests/twin_tiny.yaml")[0].data.schema
    cols = random_columns(schema, np.random.default_rng(11), 8, {"history": (0, 12)})
    b = 8 // world_size
    return columns_to_batch(schema, {k: v[rank * b:(rank + 1) * b] for k, v in cols.items()})


TWIN_CASE = ParityCase(_twin_train_module, _twin_batch)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_twin_parity(sharding_type: str) -> None:
    """The TWIN entry (GSU top-K, ESU, short-term DIN, cross and time features), sharded on 2 ranks, matches
    its unsharded self after one step."""
    results = run_workers(check_sharding_parity, world_size=2, args=(TWIN_CASE, sharding_type))
    assert results[0]["loss"] == results[1]["loss"]


def _dare_train_module(device, time_mode: str = "bias"):
    from dataclasses import replace
    from pathlib import Path

    from launch.config import load_config

    cfg, spec, _ = load_config(Path(__file__).resolve().parents[2] / "configs/tests/dare_tiny.yaml")
    model_cfg = replace(cfg.model, mlp_batch_norm=False, top_k=4, relevance_feature=None, time_mode=time_mode)
    tm = spec.build_train_module(spec.build(model_cfg, cfg.data.schema, device), model_cfg)
    if device.type != "meta":  # the sharded copy gets the reference's state
        import torch

        with torch.no_grad():  # larger embeddings than torchrec's init: attention gradients well above atol
            for t in tm.model.items.parameters():
                t.mul_(30.0)
    return tm


DARE_CASES = {mode: ParityCase(functools.partial(_dare_train_module, time_mode=mode), _twin_batch)
              for mode in ("bias", "embed")}  # embed: the dense time-bucket tables, replicated, beside the sharded
# The two tables of one feature sharded apart: another sharding type each, so also other ranks.
DARE_SPLIT = {"t_item_id__attn": "table_wise", "t_item_id__repr": "row_wise",
              "t_item_category__attn": "row_wise", "t_item_category__repr": "table_wise"}


@pytest.mark.parametrize("time_mode", ["bias", "embed"])
def test_dare_parity_with_attention_and_representation_tables_sharded_apart(time_mode: str) -> None:
    """DARE (d_att = d_repr / 2) on 2 ranks with t_item_id__attn table-wise and t_item_id__repr row-wise (and the
    category pair the other way round) matches its unsharded self after one step; the plan records the split."""
    results = run_workers(check_sharding_parity, world_size=2, args=(DARE_CASES[time_mode], DARE_SPLIT))
    assert results[0]["loss"] == results[1]["loss"]
    plan = {t: ps for mp in results[0]["plan"].plan.values() for t, ps in mp.items()}
    assert plan["t_item_id__attn"].sharding_type == "table_wise" and plan["t_item_id__repr"].sharding_type == "row_wise"
    assert len(set(plan["t_item_id__attn"].ranks)) == 1 and set(plan["t_item_id__repr"].ranks) == {0, 1}
    assert plan["t_item_id__attn"].sharding_spec.shards[0].shard_sizes[1] == 4  # d_att
    assert plan["t_item_id__repr"].sharding_spec.shards[0].shard_sizes[1] == 8  # d_repr
