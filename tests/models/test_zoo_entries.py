"""The contract of every zoo entry, for every entry of the registry (``models.registry.all_specs()``).

Each entry is tested with its own tiny config (``configs/tests/<name>_tiny.yaml``: its model YAML and data
schema) on random batches of that schema made by the reader's decoding, so adding an entry (its folder, its
YAML files, one import line) adds it here: the train-module contract, the meta build the trainer shards, its
tables and default constraints, fx tracing as TrainPipelineSparseDist does it, sequence caps, and fitting a
fixed batch. Model-specific behaviour (reference parity, what a model learns) lives in the
entries' own test files.
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

from datasets.batch import Batch
from datasets.schema import SchemaConfig, table_name
from launch.config import load_config
from launch.sharding import SHARDING_TYPES, embedding_tables
from models.base import TrainOutput
from models.registry import ModelSpec, TableConstraint, all_specs
from tests.models.batch_helpers import columns_to_batch, random_columns

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = sorted(all_specs())
MAX_LEN = 6  # sequence lengths of uncapped groups: 0..MAX_LEN


@functools.cache
def _entry(name: str) -> tuple[ModelSpec, Any, SchemaConfig]:
    cfg, spec, _ = load_config(ROOT / f"configs/tests/{name}_tiny.yaml")
    assert spec.name == name
    return spec, cfg.model, cfg.data.schema


def _train_module(name: str, device: str = "cpu") -> torch.nn.Module:
    spec, model_cfg, schema = _entry(name)
    torch.manual_seed(0)
    return spec.build_train_module(spec.build(model_cfg, schema, torch.device(device)), model_cfg)


def _lengths(name: str, low: int = 0) -> dict[str, tuple[int, int]]:
    """(min, max) row lengths per sequence group: capped groups run past their cap by 2..4 elements."""
    spec, model_cfg, schema = _entry(name)
    caps = spec.sequence_caps(model_cfg, schema)
    return {g: (caps[g] + 2, caps[g] + 4) if g in caps else (low, MAX_LEN) for g in schema.sequence_groups()}


def _columns(name: str, seed: int, rows: int = 6) -> dict[str, list[Any]]:
    _, _, schema = _entry(name)
    return random_columns(schema, np.random.default_rng(seed), rows, _lengths(name))


def _batch(name: str, seed: int, rows: int = 6) -> Batch:
    return columns_to_batch(_entry(name)[2], _columns(name, seed, rows))


def _logits(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return module(batch)[1].logits


def _capped() -> list[tuple[str, str, int]]:
    out = []
    for name in ENTRIES:
        spec, model_cfg, schema = _entry(name)
        out += [(name, g, n) for g, n in spec.sequence_caps(model_cfg, schema).items()]
    return out


def test_the_registry_has_entries():
    assert len(ENTRIES) >= 2 and all(all_specs()[n].name == n for n in ENTRIES)


@pytest.mark.parametrize("name", ENTRIES)
def test_train_module_contract(name: str):
    module = _train_module(name)
    loss, out = module(_batch(name, 0))
    assert isinstance(out, TrainOutput) and loss.ndim == 0 and torch.isfinite(loss)
    n, t = out.logits.shape
    assert n >= 6 and t >= 1 and out.labels.shape == (n, t) and out.mask.shape == (n, t) and out.groups.shape == (n,)
    assert out.mask.dtype == torch.bool and out.mask.any() and torch.isfinite(out.logits).all()
    assert set(out.labels[out.mask].unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out.loss, loss.detach())
    assert not out.logits.requires_grad and all(not p.requires_grad for p in out.loss_parts.values())
    loss.backward()
    no_grad = [k for k, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters the loss does not reach: {no_grad}"


@pytest.mark.parametrize("name", ENTRIES)
def test_builds_on_meta_with_its_tables_and_constraints(name: str):
    spec, model_cfg, schema = _entry(name)
    module = _train_module(name, "meta")
    assert all(p.is_meta for p in module.parameters())
    # DMP materialises meta parameters with empty_like + reset_parameters: every owner must have one.
    owners = [m for m in module.modules() if list(m.parameters(recurse=False))]
    assert owners and all(hasattr(m, "reset_parameters") for m in owners)
    tables = embedding_tables(module)  # names parse as table_name(table, role), unique in the model
    sizes = schema.table_sizes()
    assert tables
    for collection in {t.module_path for t in tables.values()}:
        m = module.get_submodule(collection)
        configs = m.embedding_configs() if hasattr(m, "embedding_configs") else m.embedding_bag_configs()
        for c in configs:
            schema_tables = {schema.id_feature(f).table or f for f in c.feature_names}  # KeyError: not a feature
            assert schema_tables == {tables[c.name].table}, (c.name, c.feature_names)
            assert c.num_embeddings == sizes[table_name(tables[c.name].table)], c.name
    defaults = spec.default_constraints(model_cfg, schema)
    assert set(defaults) <= set(tables)
    for c in defaults.values():
        assert isinstance(c, TableConstraint) and set(c.sharding_types) <= set(SHARDING_TYPES)
    caps = spec.sequence_caps(model_cfg, schema)
    assert set(caps) <= set(schema.sequence_groups()) and all(n > 0 for n in caps.values())


@pytest.mark.parametrize("name", ENTRIES)
def test_forward_traces_like_the_sparse_dist_pipeline(name: str):
    """TrainPipelineSparseDist fx-traces the forward with the (sharded) collections as leaves."""
    module = _train_module(name)
    leaves = sorted({t.module_path for t in embedding_tables(module).values()})
    graph = Tracer(leaf_modules=leaves).trace(module)
    traced = torch.fx.GraphModule(module, graph)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    assert set(leaves) <= called, f"collections not called as leaves: {set(leaves) - called}"
    batch = _batch(name, 4)
    torch.testing.assert_close(_logits(traced, batch), _logits(module, batch))


@pytest.mark.parametrize("name, group, cap", _capped(), ids=lambda v: str(v))
def test_only_the_most_recent_elements_of_a_capped_group_count(name: str, group: str, cap: int):
    _, _, schema = _entry(name)
    module = _train_module(name).eval()
    cols = _columns(name, 3)
    base = _logits(module, columns_to_batch(schema, cols))
    in_group = [f for f in [*schema.id_features, *schema.float_features] if f.sequence and f.group == group]
    assert in_group
    older, newer = copy.deepcopy(cols), copy.deepcopy(cols)
    for f in in_group:
        for row_old, row_new in zip(older[f.name], newer[f.name]):
            if isinstance(row_old[0], float):
                row_old[:-cap] = [v + 0.5 for v in row_old[:-cap]]
                row_new[-cap] += 0.5
            else:
                n = schema.id_feature(f.name).num_embeddings
                row_old[:-cap] = [v % (n - 1) + 1 for v in row_old[:-cap]]  # other ids, still in [1, n)
                row_new[-cap] = row_new[-cap] % (n - 1) + 1
    # Elements older than the last `cap` do not count; the oldest of them that does count changes the output.
    torch.testing.assert_close(_logits(module, columns_to_batch(schema, older)), base)
    assert not torch.allclose(_logits(module, columns_to_batch(schema, newer)), base)


@pytest.mark.parametrize("name", ENTRIES)
def test_adagrad_fits_a_fixed_batch(name: str):
    """32 random rows of random labels: the tables alone can memorise them (the zoo's default optimizer)."""
    module = _train_module(name)
    batch = _batch(name, 5, rows=32)
    opt = torch.optim.Adagrad(module.parameters(), lr=0.1)
    with torch.no_grad():
        before = module(batch)[0].item()
    for _ in range(30):
        opt.zero_grad()
        module(batch)[0].backward()
        opt.step()
    with torch.no_grad():
        after = module(batch)[0].item()
    assert after < 0.3 * before, (before, after)
