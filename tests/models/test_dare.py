"""DARE (models/dare): gradient isolation of the two tables, tied tables reduce to TWIN, the Table 1 variants."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import load_config
from launch.sharding import embedding_tables
from models.dare.model import DARE
from tests.models.batch_helpers import columns_to_batch, random_columns

ROOT = Path(__file__).resolve().parents[2]


def _setup(seed: int = 0, **overrides):
    cfg, spec, _ = load_config(ROOT / "configs/tests/dare_tiny.yaml")
    model_cfg = replace(cfg.model, **overrides)
    schema = cfg.data.schema
    cols = random_columns(schema, np.random.default_rng(seed), 8, {"history": (2, 30)})
    torch.manual_seed(seed)
    model = spec.build(model_cfg, schema, torch.device("cpu"))
    with torch.no_grad():  # embeddings well away from 0, so that every gradient is clearly non-zero
        for p in model.items.parameters():
            p.mul_(30.0)
    return model, columns_to_batch(schema, cols)


def _tables(model, role: str) -> list[torch.Tensor]:
    return [p for n, p in model.items.named_parameters() if n.endswith(f"__{role}.weight")]


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def test_attention_gradients_reach_only_attention_tables_and_vice_versa():
    model, batch = _setup()
    v, query, keys, bias = model.attention_inputs(batch)
    result = model._search(batch, query, keys, bias, v.lengths)
    weights, values = model.attend(v, query, keys, bias, result)
    attn, rep = _tables(model, "attn"), _tables(model, "repr")
    assert len(attn) == 2 and len(rep) == 2
    probe = torch.randn_like(weights)
    attention_only = (weights * probe).sum()
    assert all(g.abs().sum() > 0 for g in _grads(attention_only, attn))
    assert all(g is None for g in _grads(attention_only, rep))  # no __repr row would change
    representation_only = (weights.detach().unsqueeze(-1) * values).sum()
    assert all(g.abs().sum() > 0 for g in _grads(representation_only, rep))
    assert all(g is None for g in _grads(representation_only, attn))  # no __attn row would change
    # And through the whole model, each table gets its gradient only along its own path.
    loss = model(batch).sum()
    full = dict(zip(["attn", "repr"], [_grads(loss, attn), _grads(loss, rep)]))
    assert all(g.abs().sum() > 0 for gs in full.values() for g in gs)


def test_time_tables_are_decoupled_too():
    """``time_mode: embed``: the time bucket's attention table gets only attention gradients, its
    representation table only representation gradients, like the item tables."""
    model, batch = _setup(time_mode="embed")
    assert model.time_bias is None
    times = model.time_tables
    assert times.attn.weight.shape == (32, 4) and times.repr.weight.shape == (32, 8)
    v, query, keys, bias = model.attention_inputs(batch)
    assert bias is None and query.shape == (8, 3 * 4) and v.history_repr.shape[-1] == 3 * 8
    # The keys carry each behaviour's bucket embedding, the query bucket 0's (the target is now).
    buckets = model._buckets(batch)
    torch.testing.assert_close(keys[:, -4:], times.attn.weight[buckets])
    torch.testing.assert_close(query[:, -4:], times.attn.weight[0].expand(8, 4))
    torch.testing.assert_close(v.history_repr[:, -8:], times.repr.weight[buckets])
    result = model._search(batch, query, keys, bias, v.lengths)
    weights, values = model.attend(v, query, keys, bias, result)
    probe = torch.randn_like(weights)
    a = _grads((weights * probe).sum(), [times.attn.weight, times.repr.weight])
    assert a[0].abs().sum() > 0 and a[1] is None
    r = _grads((weights.detach().unsqueeze(-1) * values).sum(), [times.attn.weight, times.repr.weight])
    assert r[0] is None and r[1].abs().sum() > 0


def test_time_tables_follow_the_table_layout():
    shared, _ = _setup(time_mode="embed", tables=1, attn_dim=8, repr_dim=8)
    assert [n for n, _ in shared.time_tables.named_parameters()] == ["shared.weight"]
    four, batch = _setup(time_mode="embed", tables=4)
    assert sorted(n for n, _ in four.time_tables.named_parameters()) == [
        "attn.weight", "attn_target.weight", "repr.weight", "repr_target.weight"]
    v, query, _, _ = four.attention_inputs(batch)
    torch.testing.assert_close(query[:, -4:], four.time_tables.attn_target.weight[0].expand(8, 4))
    logits = four(batch)
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()


def test_shared_table_gets_both_gradients():
    """TWIN's shared table (tables: 1) is where the two gradients meet: the conflict DARE removes."""
    model, batch = _setup(tables=1, attn_dim=8, repr_dim=8)
    v, query, keys, bias = model.attention_inputs(batch)
    result = model._search(batch, query, keys, bias, v.lengths)
    weights, values = model.attend(v, query, keys, bias, result)
    shared = [p for n, p in model.items.named_parameters() if "shared" in n]
    a = _grads((weights * torch.randn_like(weights)).sum(), shared)
    r = _grads((weights.detach().unsqueeze(-1) * values).sum(), shared)
    assert all(x.abs().sum() > 0 and y.abs().sum() > 0 for x, y in zip(a, r))


@pytest.mark.parametrize("time_mode", ["bias", "embed"])
def test_dare_with_tied_tables_reduces_to_twin(time_mode):
    dare, batch = _setup(seed=3, tables=2, attn_dim=8, repr_dim=8, time_mode=time_mode)
    twin, _ = _setup(seed=3, tables=1, attn_dim=8, repr_dim=8, time_mode=time_mode)
    state = twin.state_dict()
    if time_mode == "embed":  # the time tables tie the same way as the item tables
        state["time_tables.shared.weight"] = dare.time_tables.attn.weight.detach().clone()
        with torch.no_grad():
            dare.time_tables.repr.weight.copy_(dare.time_tables.attn.weight)
    for name, p in dare.state_dict().items():
        if ".items." not in f".{name}" and not name.startswith("time_tables."):
            state_name = name
            assert state_name in state
            state[state_name] = p
    # The shared table takes DARE's attention table; DARE's representation table is tied to it.
    for feature in ("item_id", "item_category"):
        attn = dare.state_dict()[f"items.attn.embeddings.t_{feature}__attn.weight"]
        state[f"items.shared.embeddings.t_{feature}.weight"] = attn
        with torch.no_grad():
            dare.items.repr.embeddings[f"t_{feature}__repr"].weight.copy_(attn)
    twin.load_state_dict(state)
    dare.eval(), twin.eval()
    a, b = dare.run(batch), twin.run(batch)
    torch.testing.assert_close(a.search.scores, b.search.scores)
    assert torch.equal(a.search.indices, b.search.indices)
    torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.parametrize(
    "overrides, roles",
    [
        ({"tables": 2, "attn_dim": 2, "repr_dim": 8}, {"attn": 2, "repr": 8}),  # d_att = d_repr / 4
        ({"tables": 1, "attn_dim": 8, "repr_dim": 8}, {None: 8}),
        ({"tables": 4}, {"attn": 4, "repr": 8, "attn_target": 4, "repr_target": 8}),
        ({"tables": 1, "attn_dim": 8, "repr_dim": 8, "projection": True}, {None: 8}),
        ({"tables": 1, "attn_dim": 8, "repr_dim": 8, "target_aware": False}, {None: 8}),
        ({"tables": 1, "attn_dim": 8, "repr_dim": 8, "search": "hard"}, {None: 8}),
    ],
)
def test_table1_variants_build_their_tables_and_train(overrides, roles):
    model, batch = _setup(**overrides)
    tables = embedding_tables(model)
    for role, dim in roles.items():
        suffix = "" if role is None else f"__{role}"
        assert tables[f"t_item_id{suffix}"].dim == dim
    assert len([t for t in tables if t.startswith("t_item_id")]) == len(roles)
    logits = model(batch)
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()
    logits.sum().backward()


def test_bad_variants_are_rejected():
    cfg, _, _ = load_config(ROOT / "configs/tests/dare_tiny.yaml")
    for bad, word in [({"tables": 3}, "tables"), ({"tables": 2, "projection": True}, "projection"),
                      ({"tables": 1, "attn_dim": 4, "repr_dim": 8}, "attn_dim == repr_dim"),
                      ({"attn_temperature": 0.0}, "attn_temperature")]:
        with pytest.raises(ValueError, match=word):
            DARE(replace(cfg.model, **bad), cfg.data.schema, torch.device("meta"))


def test_attention_temperature_divides_the_logits():
    """T = 2: the ESU's weights are the softmax of half the T = 1 logits (same tables, no time bias)."""
    base, batch = _setup(3)
    hot, _ = _setup(3, attn_temperature=2.0)
    hot.load_state_dict(base.state_dict())
    with torch.no_grad():
        v, query, keys, _ = base.attention_inputs(batch)
        result = base._search(batch, query, keys, None, v.lengths)
        w1, _ = base.attend(v, query, keys, None, result)
        w2, _ = hot.attend(v, query, keys, None, result)
        logits = torch.log(w1.clamp(min=1e-30))  # softmax logits up to a per-row constant
        expected = torch.softmax(torch.where(w1 > 0, logits / 2, -torch.inf), dim=1)
        torch.testing.assert_close(w2, torch.nan_to_num(expected), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(w1, w2)
