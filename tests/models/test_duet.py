"""DUET and the pre-ranking baselines: each training scheme's loss against its formula written out, gradient
isolation of the pseudo labels, the set module's candidate interactions and permutation equivariance, and the
evaluation rows (tasks, masks, users)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from launch.config import load_config
from models.duet import PreRankingModel, PreRankingTrainModule, Training
from tests.models.batch_helpers import columns_to_batch, random_columns

ROOT = Path(__file__).resolve().parents[2]


def _setup(entry: str = "duet", seed: int = 0, **overrides):
    cfg, spec, _ = load_config(ROOT / f"configs/tests/{entry}_tiny.yaml")
    model_cfg = dataclasses.replace(cfg.model, **overrides)
    torch.manual_seed(seed)
    module = spec.build_train_module(spec.build(model_cfg, cfg.data.schema, torch.device("cpu")), model_cfg)
    return module, cfg.data.schema


def _columns(schema, seed: int = 0, rows: int = 8):
    cols = random_columns(schema, np.random.default_rng(seed), rows, {"history": (1, 12), "candidates": (3, 9)})
    # Coherent labels: observed click = exposed * true click; propensities in (0, 1].
    for r in range(rows):
        cols["cand_click"][r] = [e * t for e, t in zip(cols["cand_exposed"][r], cols["cand_true_click"][r])]
        cols["cand_propensity"][r] = [0.05 + 0.9 * p for p in cols["cand_propensity"][r]]
    cols["request_id"] = list(range(100, 100 + rows))
    return cols


def _flat(batch, name):
    return batch.sequence_labels[name].values()


def _wmean(x, w):
    return (x * w).sum() / w.sum().clamp(min=1.0)


def _kl(t, z):  # KL(t || sigmoid(z)) elementwise, t soft
    p = torch.sigmoid(z)
    eps = 1e-12
    return t * torch.log((t + eps) / p) + (1 - t) * torch.log((1 - t + eps) / (1 - p))


@pytest.mark.parametrize("scheme", list(Training))
def test_each_training_scheme_is_its_formula(scheme: Training):
    entry = "duet" if scheme in (Training.cotrain, Training.ukd) else "two_tower"
    module, schema = _setup(entry, training=scheme, pseudo_weight=0.7, kl_weight=0.3)
    batch = columns_to_batch(schema, _columns(schema, 1))
    loss, out = module(batch)
    m: PreRankingModel = module.model
    y, o = _flat(batch, "cand_click"), _flat(batch, "cand_exposed")
    p = batch.float_sequences["cand_propensity"].values().clamp(min=m.cfg.propensity_floor)
    w = torch.ones_like(y)
    bce = lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="none")  # noqa: E731
    with torch.no_grad():
        za = m.a(batch).logits
        if scheme == Training.exposed:
            want = _wmean(bce(za, y), o)
        elif scheme == Training.ips:
            want = (bce(za, y) * o / p).sum() / len(y)
        elif scheme == Training.dr_jl:
            t = torch.sigmoid(m.imputation(m.a(batch).hidden).squeeze(-1))
            e, e_hat = bce(za, y), bce(za, t)
            want = (e_hat + o / p * (e - e_hat)).mean() + (o / p * (e - e_hat) ** 2).mean()
        else:
            zb = m.b(batch).logits
            if scheme == Training.ukd:  # serve a: a is the student, b its teacher
                pt = torch.sigmoid(zb)
                conf = (2 * pt - 1).abs()
                want = _wmean(bce(zb, y), o) + _wmean(bce(za, y), o) + 0.7 * _wmean(_kl(pt, za) * conf, 1 - o)
            else:
                pa, pb = torch.sigmoid(za), torch.sigmoid(zb)
                kl_sym = ((pa - pb) * (za - zb)).mean()
                want = (_wmean(bce(za, y), o) + _wmean(bce(zb, y), o)
                        + 0.7 * (_wmean(_kl(pb, za), 1 - o) + _wmean(_kl(pa, zb), 1 - o)) + 0.3 * kl_sym)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)
    assert set(out.loss_parts) and all(torch.isfinite(v) for v in out.loss_parts.values())


def test_cotrain_gives_no_gradient_through_a_models_own_pseudo_labels():
    module, schema = _setup("duet", training=Training.cotrain, kl_weight=0.0)
    batch = columns_to_batch(schema, _columns(schema, 2))
    m = module.model
    za, zb = m.a(batch).logits, m.b(batch).logits
    y, o = _flat(batch, "cand_click"), _flat(batch, "cand_exposed")
    parts: dict[str, torch.Tensor] = {}
    w = torch.ones_like(y)
    module._cotrain(za, zb, y, w, w * o, w * (1 - o), parts)
    assert float((1 - o).sum()) > 0
    # A's loss (its exposed BCE and its pseudo-labelled part, labels from B) reaches no parameter of B, and vice versa.
    for own, other in (("a", "b"), ("b", "a")):
        loss = parts[f"bce_{own}"] + parts[f"pseudo_{own}"]
        params = list(getattr(m, other).parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), other
        mine = torch.autograd.grad(loss, list(getattr(m, own).parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in mine)
    # The KL term trains both.
    kl = parts["kl"]
    for sub in (m.a, m.b):
        grads = torch.autograd.grad(kl, list(sub.parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_ukd_teacher_learns_nothing_from_the_student():
    module, schema = _setup("duet", training=Training.ukd, serve="b")
    batch = columns_to_batch(schema, _columns(schema, 3))
    m = module.model
    za, zb = m.a(batch).logits, m.b(batch).logits  # serve b: b is the student, a the teacher
    y, o = _flat(batch, "cand_click"), _flat(batch, "cand_exposed")
    parts: dict[str, torch.Tensor] = {}
    module._ukd(zb, za, y, o, 1 - o, parts)
    grads = torch.autograd.grad(parts["bce_student"] + parts["pseudo"], list(m.a.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    _, out = module(batch)
    with torch.no_grad():
        torch.testing.assert_close(out.logits[:, 0], m.b(batch).logits)  # evaluation scores with the student


def _logits(module, schema, cols):
    with torch.no_grad():
        return module.model.a(columns_to_batch(schema, cols)).logits


def _row_slices(cols):
    starts = np.cumsum([0] + [len(c) for c in cols["cand_item_id"]])
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def test_candidate_to_candidate_attention_lets_candidates_interact_and_is_permutation_equivariant():
    for set_attention in (True, False):
        module, schema = _setup("duet", training=Training.exposed, set_attention=set_attention)
        module.eval()
        cols = _columns(schema, 4)
        base = _logits(module, schema, cols)
        rows = _row_slices(cols)
        # Change the last candidate of request 0: with c2c attention every other candidate's score moves.
        other = copy.deepcopy(cols)
        n_items = schema.id_feature("cand_item_id").num_embeddings
        other["cand_item_id"][0][-1] = other["cand_item_id"][0][-1] % (n_items - 1) + 1
        changed = _logits(module, schema, other)
        first = rows[0]
        same_others = torch.allclose(changed[first][:-1], base[first][:-1])
        assert same_others != set_attention, set_attention
        torch.testing.assert_close(changed[rows[1].start:], base[rows[1].start:])  # other requests unaffected
        # Permuting request 0's candidates (all candidate columns together) permutes its scores.
        perm = np.random.default_rng(0).permutation(first.stop - first.start)
        permuted = copy.deepcopy(cols)
        for name in ("cand_item_id", "cand_category", "cand_cross", "cand_propensity", "cand_stage", "cand_click",
                     "cand_exposed", "cand_true_click"):
            permuted[name][0] = [cols[name][0][i] for i in perm]
        out = _logits(module, schema, permuted)
        torch.testing.assert_close(out[first], base[first][torch.as_tensor(perm)], rtol=1e-5, atol=1e-6)


def test_evaluation_rows_tasks_masks_and_users():
    module, schema = _setup("duet")
    assert isinstance(module, PreRankingTrainModule)
    cols = _columns(schema, 5)
    batch = columns_to_batch(schema, cols)
    _, out = module(batch)
    n = sum(len(c) for c in cols["cand_item_id"])
    assert module.tasks == ["cand_click", "cand_click@all", "cand_exposed", "cand_true_click"]
    assert out.logits.shape == (n, 4) and torch.equal(out.logits[:, 0], out.logits[:, 3])
    exposed = torch.tensor([v for row in cols["cand_exposed"] for v in row]) > 0.5
    assert torch.equal(out.mask[:, 0], exposed) and out.mask[:, 1:].all()  # click: exposed only; the rest: all
    assert torch.equal(out.labels[:, 0], out.labels[:, 1])  # cand_click@all: the same clicks over all candidates
    want_users = torch.tensor([u for u, c in zip(cols["user_id"], cols["cand_item_id"]) for _ in c])
    want_requests = torch.tensor([r for r, c in zip(cols["request_id"], cols["cand_item_id"]) for _ in c])
    assert torch.equal(out.users, want_users) and torch.equal(out.groups, want_requests)
    torch.testing.assert_close(out.labels[:, 3], torch.tensor([v for row in cols["cand_true_click"] for v in row]))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="propensity"):
        _setup("two_tower", training=Training.ips, propensity=None)
    with pytest.raises(ValueError, match="cross"):
        _setup("three_tower", cross_features=[])
    with pytest.raises(ValueError, match="serve"):
        _setup("duet", serve="c")
    with pytest.raises(ValueError, match="user_features"):
        _setup("duet", user_features=[])
    with pytest.raises(ValueError, match="sequence label"):
        _setup("duet", exposure="cand_seen")


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("set_attention", [True, False])
@pytest.mark.parametrize("cross", [True, False])
def test_serving_score_equals_the_forward_logits(attention, set_attention, cross):
    """``PreRanker.score`` (the MLP's first layer as block products, the attentions folded into it) gives the
    logits of ``forward``; requests of different candidate counts (padding) and one without history."""
    over = dict(training=Training.cotrain, attention=attention, set_attention=set_attention)
    if not cross:
        over["cross_features"] = []
    module, schema = _setup("duet", **over)
    module.eval()
    cols = _columns(schema, 6, rows=5)
    cols["hist_item_id"][2], cols["hist_category"][2] = [], []  # no valid key for c2s in request 2
    batch = columns_to_batch(schema, cols)
    for sub in (module.model.a, module.model.b):
        with torch.no_grad():
            want = sub(batch).logits
            got = sub.score(batch)
        assert got.shape == want.shape == (sum(len(c) for c in cols["cand_item_id"]),)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sub.score(batch), want, atol=1e-6, rtol=1e-5)  # with autograd on, too
        for tile in (1, 12):  # 1 and 2 candidates of each of the 5 requests per step: the same logits
            with torch.no_grad():
                torch.testing.assert_close(sub.score(batch, tile=tile), want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # serving goes through score, with the served sub-model
        torch.testing.assert_close(module.model(batch), module.model.a(batch).logits, atol=1e-6, rtol=1e-5)


def test_serving_score_of_the_towers_is_their_forward():
    module, schema = _setup("three_tower", training=Training.exposed)
    module.eval()
    batch = columns_to_batch(schema, _columns(schema, 7))
    with torch.no_grad():
        assert torch.equal(module.model(batch), module.model.a(batch).logits)
