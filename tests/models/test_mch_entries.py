"""Every zoo entry with ``mapping: mch`` on its item table (``t_item_id``), fed raw 64-bit item ids.

Per entry (its tiny config's schema, the item table's features switched to mch): the meta build's item
table is a managed-collision collection the planner sees (defaults: row-wise only); a training forward on
raw ids far above the table size gives a finite loss whose gradient reaches every parameter; and the
forward fx-traces as TrainPipelineSparseDist traces it (collections as leaves) with the same logits.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchrec.distributed.train_pipeline.tracing import Tracer

from datasets.schema import IdMapping, SchemaConfig
from launch.config import load_config
from launch.sharding import embedding_tables
from models.registry import ModelSpec, all_specs
from tests.models.batch_helpers import columns_to_batch, random_columns

ROOT = Path(__file__).resolve().parents[2]
ZOO = sorted(n for n, spec in all_specs().items() if spec.config_cls.__module__.startswith("models."))


@functools.cache
def _entry(name: str) -> tuple[ModelSpec, Any, SchemaConfig]:
    cfg, spec, _ = load_config(ROOT / f"configs/tests/{name}_tiny.yaml")
    schema = copy.deepcopy(cfg.data.schema)
    for f in schema.id_features:
        if f.table_name == "t_item_id":
            f.mapping = IdMapping.mch
    schema.validate()
    return spec, cfg.model, schema


def _module(name: str, device: str = "cpu") -> torch.nn.Module:
    spec, model_cfg, schema = _entry(name)
    torch.manual_seed(0)
    return spec.build_train_module(spec.build(model_cfg, schema, torch.device(device)), model_cfg)


def _raw_batch(name: str, seed: int):
    """Random rows of the entry's schema; the item table's ids are raw 64-bit ids (a few hundred distinct)."""
    spec, model_cfg, schema = _entry(name)
    caps = spec.sequence_caps(model_cfg, schema)
    lengths = {g: (caps[g] + 1, caps[g] + 3) if g in caps else (1, 6) for g in schema.sequence_groups()}
    rng = np.random.default_rng(seed)
    cols = random_columns(schema, rng, 6, lengths)
    for f in schema.id_features:
        if f.mapping is IdMapping.mch:
            def raw(v: int) -> int:
                return int(v) * 0x9E3779B97F4A7 % 2**62 + 2**62  # odd factor mod 2**62: distinct ids stay distinct
            values = cols[f.name]
            cols[f.name] = [[raw(v) for v in row] for row in values] if f.sequence else [raw(v) for v in values]
    return columns_to_batch(schema, cols)


@pytest.mark.parametrize("name", ZOO)
def test_meta_build_has_a_managed_item_table_planned_row_wise(name: str) -> None:
    spec, model_cfg, schema = _entry(name)
    tables = embedding_tables(_module(name, "meta"))
    items = [t for n, t in tables.items() if t.table == "item_id"]
    assert items and all(t.module_type.__name__ == "ManagedCollisionEmbeddingCollection" for t in items), items
    others = [t for t in tables.values() if t.table != "item_id"]
    assert all(t.module_type.__name__ == "EmbeddingCollection" for t in others)
    for table, c in spec.default_constraints(model_cfg, schema).items():
        if tables[table].table == "item_id":
            assert c.sharding_types == ("row_wise",), (table, c)


@pytest.mark.parametrize("name", ZOO)
def test_trains_on_raw_ids_and_traces_like_the_pipeline(name: str) -> None:
    module = _module(name)
    batch = _raw_batch(name, 0)
    assert int(batch.sparse_features.values().max()) > 2**62  # raw ids reach the model
    loss, out = module(batch)  # training: the ZCH admits the ids
    assert torch.isfinite(loss) and torch.isfinite(out.logits).all()
    loss.backward()
    no_grad = [k for k, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters the loss does not reach: {no_grad}"
    # Still training (as the pipeline traces): the ids are in the ZCH now, the same batch keeps its rows.
    leaves = sorted({t.module_path for t in embedding_tables(module).values()})
    graph = Tracer(leaf_modules=leaves).trace(module)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    assert set(leaves) <= called, f"collections not called as leaves: {set(leaves) - called}"
    traced = torch.fx.GraphModule(module, graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(batch)[1].logits, module(batch)[1].logits)
