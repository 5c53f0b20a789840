"""The two-stage entries (models/twin): search variants, SIM-soft's separate tables, the projection cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import load_config
from launch.twin_cache import fill_cache, item_attributes
from models.twin.model import Search, TwoStage
from modules.search import SearchResult, search_quality
from modules.sequence import jagged_offsets
from tests.models.batch_helpers import columns_to_batch, random_columns

ROOT = Path(__file__).resolve().parents[2]


def _setup(name: str, seed: int = 0, rows: int = 8, lengths=(0, 40), **overrides):
    cfg, spec, _ = load_config(ROOT / f"configs/tests/{name}_tiny.yaml")
    model_cfg = replace(cfg.model, **overrides)
    schema = cfg.data.schema
    cols = random_columns(schema, np.random.default_rng(seed), rows, {"history": lengths})
    # Few distinct categories, so that the hard search finds matches.
    cols["hist_category"] = [[1 + v % 3 for v in row] for row in cols["hist_category"]]
    cols["item_category"] = [1 + v % 3 for v in cols["item_category"]]
    torch.manual_seed(seed)
    model = spec.build(model_cfg, schema, torch.device("cpu"))
    return model, spec.build_train_module(model, model_cfg), columns_to_batch(schema, cols), cols


def test_hard_search_keeps_the_most_recent_behaviours_of_the_target_category():
    model, _, batch, cols = _setup("sim_hard", lengths=(0, 40), top_k=5)
    out = model.run(batch)
    offsets = jagged_offsets(out.lengths)
    flat = [c for row in cols["hist_category"] for c in row]
    for b, row in enumerate(cols["hist_category"]):
        matches = [int(offsets[b]) + p for p, c in enumerate(row) if c == cols["item_category"][b]]
        want = list(reversed(matches))[:5]
        got = out.search.indices[b][out.search.valid[b]].tolist()
        assert got == want, b
        assert all(flat[i] == cols["item_category"][b] for i in got)


def test_sim_soft_tables_learn_only_from_the_auxiliary_loss():
    model, tm, batch, _ = _setup("sim_soft", lengths=(3, 30))
    out = model.run(batch)
    gsu = {n: p for n, p in model.named_parameters() if "__gsu" in n}
    assert gsu and out.aux_logits is not None
    grads = torch.autograd.grad(out.logits.sum(), list(gsu.values()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # the CTR path never reaches the gsu tables
    grads = torch.autograd.grad(out.aux_logits.sum(), list(gsu.values()))
    assert all(g.abs().sum() > 0 for g in grads)
    others = [p for n, p in model.named_parameters() if "__gsu" not in n and n != "aux_bias"]
    grads = torch.autograd.grad(out.aux_logits.sum(), others, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # the auxiliary loss reaches nothing else
    loss, parts = tm(batch)
    assert set(parts.loss_parts) == {"ctr", "gsu_aux"}
    torch.testing.assert_close(loss, parts.loss_parts["ctr"] + parts.loss_parts["gsu_aux"])


@pytest.mark.parametrize("keys", ["distinct", "folded"])
def test_gsu_key_paths_change_nothing(keys):
    a, _, batch, _ = _setup("twin", seed=1, lengths=(0, 60), gsu_keys=keys)
    b, _, _, _ = _setup("twin", seed=1, lengths=(0, 60), gsu_keys="naive")
    with torch.no_grad():  # a trained-like relevance: cross-feature bias on, W_q apart from W_h
        a.relevance.beta.normal_()
        a.relevance.w_q.weight.normal_()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    ra, rb = a.run(batch), b.run(batch)
    torch.testing.assert_close(ra.search.scores, rb.search.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(ra.search.indices, rb.search.indices)
    torch.testing.assert_close(ra.logits, rb.logits)


def test_projection_cache_gives_the_uncached_scores(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, _, batch, cols = _setup("twin", seed=2, lengths=(0, 60), gsu_cache=True)
    # Items' categories as the cache command reads them from the data files.
    cols["hist_category"] = [[1 + (i % 3) for i in row] for row in cols["hist_item_id"]]
    cols["item_category"] = [1 + (i % 3) for i in cols["item_id"]]
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({k: cols[k] for k in ["item_id", "item_category", "hist_item_id", "hist_category"]}), path)
    batch = columns_to_batch(load_config(ROOT / "configs/tests/twin_tiny.yaml")[0].data.schema, cols)
    n = model.cache_ec.embedding_configs()[0].num_embeddings
    attrs, info = item_attributes([str(path)], model.cfg.target_features, model.cfg.history_features, n)
    assert info["items_with_several_values"] == 0 and info["items_seen"] > 0
    cache = fill_cache(model, attrs, info["seen"])
    assert cache.shape == (n, model.cfg.num_heads * model.cfg.head_dim)
    model.eval()
    cached = model.run(batch)
    saved, model.cache_ec = model.cache_ec, None
    live = model.run(batch)
    model.cache_ec = saved
    torch.testing.assert_close(cached.search.scores, live.search.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached.search.indices, live.search.indices)
    torch.testing.assert_close(cached.logits, live.logits)
    model.train()  # training never reads the (stale) cache
    assert model.cfg.search == Search.soft


def test_search_quality_on_a_hand_made_row():
    # One row of 4 behaviours, K = 2: true relevance [0.1, 0.9, 0.0, 0.5]; the GSU kept flat indices 3 then 0.
    rel = torch.tensor([0.1, 0.9, 0.0, 0.5])
    res = SearchResult(indices=torch.tensor([[3, 0]]), valid=torch.tensor([[True, True]]), scores=rel)
    q = search_quality(rel, torch.tensor([4]), res, 2)
    d = 1 / np.log2(np.arange(2) + 2)
    assert abs(float(q["gsu_ndcg@2"][0]) - (0.5 * d[0] + 0.1 * d[1]) / (0.9 * d[0] + 0.5 * d[1])) < 1e-6
    assert float(q["gsu_recall@2"][0]) == 0.5  # {1, 3} are the true top 2; 3 was kept
    short = search_quality(rel, torch.tensor([2, 2]), SearchResult(torch.tensor([[1, 0], [3, 2]]),
                                                                   torch.ones(2, 2, dtype=torch.bool), rel), 2)
    assert torch.isnan(short["gsu_ndcg@2"]).all()  # rows not longer than K: a trivial search, undefined


def test_two_stage_rejects_a_hard_search_without_the_category():
    cfg, _, _ = load_config(ROOT / "configs/tests/sim_hard_tiny.yaml")
    bad = replace(cfg.model, hard_search_feature="hist_behavior_type")
    try:
        TwoStage(bad, cfg.data.schema, torch.device("meta"))
    except ValueError as e:
        assert "hard_search_feature" in str(e)
    else:
        raise AssertionError("accepted")


def test_oracle_search_keeps_the_true_top_k_and_needs_the_relevance_feature():
    """``search: oracle`` (a diagnostic) hands the ESU the K behaviours of highest true relevance; NDCG@K is 1."""
    model, _, batch, _ = _setup("twin", lengths=(0, 40), top_k=5, search=Search.oracle,
                                relevance_feature="hist_relevance")
    out = model.run(batch)
    truth = batch.float_sequences["hist_relevance"].values()
    ends = torch.cumsum(out.lengths, 0)
    for b in range(out.lengths.numel()):
        row = truth[int(ends[b] - out.lengths[b]) : int(ends[b])]
        got = truth[out.search.indices[b][out.search.valid[b]]]
        assert torch.equal(got, torch.sort(row, descending=True).values[:5]), b  # the best 5, best first
    q = search_quality(truth, out.lengths, out.search, 5)
    long_rows = out.lengths > 5
    assert long_rows.any() and torch.allclose(q["gsu_ndcg@5"][long_rows], torch.ones(int(long_rows.sum())))
    with pytest.raises(ValueError, match="relevance_feature"):
        _setup("twin", search=Search.oracle, relevance_feature=None)
