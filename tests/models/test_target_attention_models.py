"""DIN and the avg-pool baseline: shapes, tables and constraints on a two-task schema, reference parity,
learning. What every zoo entry must do (meta build, tracing, sequence caps, ...): test_zoo_entries.py."""

import dataclasses

import pytest
import torch

from datasets.batch import Batch
from models.avgpool import AvgPoolConfig, AvgPoolLastN
from models.din import DIN, DINConfig
from models.registry import TableConstraint, get_spec
from tests.models.batch_helpers import make_batch, random_batch, random_rows, tiny_schema

SCHEMA = tiny_schema(("click", "like"))
SMALL = dict(embedding_dim=4, mlp_hidden=[8], dropout=0.0, history_length=3, attention_hidden=[6])
MODELS = {DINConfig: DIN, AvgPoolConfig: AvgPoolLastN}  # the models this file tests, by config class
# Each at its config_cls() defaults, shrunk by the SMALL fields it has.
CONFIGS = {
    c().name: dataclasses.replace(c(), **{k: v for k, v in SMALL.items() if hasattr(c(), k)}) for c in MODELS
}
NAMES = sorted(CONFIGS)


def _build(name: str, device: str = "cpu", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = get_spec(name)
    cfg = dataclasses.replace(CONFIGS[name], **overrides)
    return spec.build(cfg, SCHEMA, torch.device(device))


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_spec(name: str):
    spec = get_spec(name)
    assert spec.name == name and spec.config_cls is type(CONFIGS[name])
    model = _build(name)
    assert isinstance(model, MODELS[spec.config_cls])
    batch = random_batch(SCHEMA, torch.Generator().manual_seed(0), 6, 7)
    logits = model(batch)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    loss, out = spec.build_train_module(model, CONFIGS[name])(batch)
    assert loss.ndim == 0 and out.logits.shape == (6, 2) and out.labels.shape == (6, 2)
    assert out.mask.shape == (6, 2) and out.mask.all() and out.groups.shape == (6,)
    torch.testing.assert_close(out.loss_parts["ctr"], loss.detach())
    assert spec.default_constraints(CONFIGS[name], SCHEMA) == {
        "t_item_id": TableConstraint(("row_wise", "table_wise")),
        "t_user_id": TableConstraint(("row_wise", "table_wise")),
    }


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta_with_shared_tables(name: str):
    model = _build(name, "meta")
    assert all(p.is_meta for p in model.parameters())
    tables = {c.name: list(c.feature_names) for c in model.embedding.ec.embedding_configs()}
    assert tables == {
        "t_user_id": ["user_id"],
        "t_item_id": ["item_id", "hist_item_id"],
        "t_item_category": ["item_category", "hist_category"],
    }
    # DMP materialises meta parameters with empty_like + reset_parameters: every owner must have one.
    owners = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert owners and all(hasattr(m, "reset_parameters") for m in owners)


def _din_reference(model: DIN, scalars, sequences, n: int) -> torch.Tensor:
    """DIN row by row from the raw tables: attention over the last n behaviours, mean, MLP."""
    tables = model.embedding.ec.embeddings
    item_w, cat_w, user_w = tables["t_item_id"].weight, tables["t_item_category"].weight, tables["t_user_id"].weight
    rows = []
    for b in range(len(scalars["user_id"])):
        target = torch.cat([item_w[scalars["item_id"][b]], cat_w[scalars["item_category"][b]]])
        history = [
            torch.cat([item_w[i], cat_w[c]])
            for i, c in zip(sequences["hist_item_id"][b][-n:], sequences["hist_category"][b][-n:])
        ]
        attended = torch.zeros_like(target)
        for e in history:
            score = model.attention.unit(torch.cat([target, e, target - e, target * e]))[0]
            attended = attended + score * e
        mean = torch.stack(history).mean(0) if history else torch.zeros_like(target)
        rows.append(torch.cat([user_w[scalars["user_id"][b]], target, attended, mean]))
    return model.mlp(torch.stack(rows))


def test_din_matches_naive_reference_when_history_fits():
    model = _build("din", history_length=8)
    scalars, sequences = random_rows(torch.Generator().manual_seed(1), 5, max_len=8)
    sequences["hist_item_id"][0] = []
    sequences["hist_category"][0] = []
    batch = make_batch(SCHEMA, scalars, sequences, torch.zeros(5, 2))
    torch.testing.assert_close(model(batch), _din_reference(model, scalars, sequences, 8))


def test_din_matches_naive_reference_on_truncated_history():
    model = _build("din", history_length=3)
    scalars, sequences = random_rows(torch.Generator().manual_seed(2), 5, max_len=9, min_len=4)
    batch = make_batch(SCHEMA, scalars, sequences, torch.zeros(5, 2))
    torch.testing.assert_close(model(batch), _din_reference(model, scalars, sequences, 3))


def _synthetic_batch(gen: torch.Generator, b: int) -> Batch:
    """Click iff the target's category equals the most recent behaviour's (learnable only from history)."""
    scalars, sequences = random_rows(gen, b, max_len=6, min_len=1)
    hit = torch.rand(b, generator=gen) < 0.5
    for i in range(b):
        if hit[i]:
            scalars["item_category"][i] = sequences["hist_category"][i][-1]
    click = torch.tensor(
        [float(scalars["item_category"][i] == sequences["hist_category"][i][-1]) for i in range(b)]
    )
    return make_batch(SCHEMA, scalars, sequences, torch.stack([click, click], dim=1))


def _train(name: str, make_opt, steps: int = 150) -> tuple[float, float]:
    """Held-out loss before and after ``steps`` optimizer steps on fresh synthetic batches of 64."""
    module = get_spec(name).build_train_module(_build(name, embedding_dim=8, mlp_hidden=[16]), CONFIGS[name])
    gen = torch.Generator().manual_seed(5)
    held_out = _synthetic_batch(torch.Generator().manual_seed(6), 512)
    opt = make_opt(module.parameters())
    with torch.no_grad():
        before = module(held_out)[0].item()
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = module(_synthetic_batch(gen, 64))
        loss.backward()
        opt.step()
    with torch.no_grad():
        return before, module(held_out)[0].item()


@pytest.mark.parametrize("name", NAMES)
def test_sgd_steps_lower_the_held_out_loss(name: str):
    before, after = _train(name, lambda p: torch.optim.SGD(p, lr=1.0))
    assert after < 0.85 * before


def test_target_attention_beats_mean_pooling_when_the_target_decides_what_matters():
    """The click depends on the behaviour that matches the target: DIN generalises, mean pooling less so."""
    _, din = _train("din", lambda p: torch.optim.Adagrad(p, lr=0.1))
    _, avgpool = _train("avgpool", lambda p: torch.optim.Adagrad(p, lr=0.1))
    assert din < 0.8 * avgpool
