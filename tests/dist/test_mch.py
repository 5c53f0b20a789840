"""A managed-collision (``mapping: mch``) collection (EmbeddingCollection and EmbeddingBagCollection forms)
sharded row-wise on 2 gloo ranks.

torchrec's sharded ZCH is not the unsharded one by design: each rank's shard is a ZCH of its own rows (with
its own miss row, the shard's last), serving the ids of one block of ``[0, input_hash_size)`` (the input
all-to-all routes each hashed id by its block). So what a 2-rank table of R rows does equals what two
unsharded ZCHs of R / 2 rows do, block by block: the reference here is torchrec's own
``rebuild_with_output_id_range`` of the unsharded module (what the sharder builds per shard), fed the ids of
its block. Checked over a skewed training stream: the rows every id is mapped to equal the reference's, the
embeddings are the gathered table's rows at those rows (pooled: their sums; 1e-6), the ZCH buffers in the DMP
state dict equal the references' (so checkpoints carry them), hot ids keep rows of their own, and evaluation
changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.dist.runner import run_workers

pytestmark = pytest.mark.dist

ROWS, DIM, STEPS, GLOBAL_B, HIST = 16, 4, 6, 8, 3
HOT = [7, -3, 2**62 + 5, 123456789012345]  # raw ids, negatives and ids far above the table size included


def _schema():
    from datasets.schema import IdFeature, IdMapping, SchemaConfig

    schema = SchemaConfig(
        id_features=[
            IdFeature("user_id", 10),
            IdFeature("item_id", ROWS, table="item_id", mapping=IdMapping.mch),
            IdFeature("hist_item_id", ROWS, sequence=True, table="item_id", mapping=IdMapping.mch),
        ],
        labels=["click"],
    )
    schema.validate()
    return schema


def _global_stream() -> list[dict[str, np.ndarray]]:
    """STEPS global batches: users, target items [B], histories [B, HIST] (hot ids in every row)."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(STEPS):
        cold = rng.integers(-(2**63), 2**63 - 1, size=(GLOBAL_B, HIST), dtype=np.int64)
        hist = np.where(rng.random((GLOBAL_B, HIST)) < 0.6, rng.choice(HOT, size=(GLOBAL_B, HIST)), cold)
        out.append({
            "user_id": rng.integers(0, 10, size=GLOBAL_B),
            "item_id": np.where(rng.random(GLOBAL_B) < 0.5, rng.choice(HOT, size=GLOBAL_B),
                                rng.integers(0, 2**63 - 1, size=GLOBAL_B, dtype=np.int64)),
            "hist_item_id": hist,
        })
    return out


def _kjt(batch: dict[str, np.ndarray], rows: slice):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    users, items, hist = batch["user_id"][rows], batch["item_id"][rows], batch["hist_item_id"][rows]
    b = len(users)
    values = np.concatenate([users, items, hist.reshape(-1)]).astype(np.int64)
    lengths = np.concatenate([np.ones(2 * b, dtype=np.int64), np.full(b, HIST)])
    return KeyedJaggedTensor(keys=["user_id", "item_id", "hist_item_id"], values=torch.from_numpy(values),
                             lengths=torch.from_numpy(lengths))


class _Holder:  # built lazily in the workers (torch imports after spawn)
    @staticmethod
    def module(device, bags: bool):
        import torch
        from torch import nn
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

        from modules.managed_collision import build_managed_collection

        schema = _schema()
        cfg = schema.id_feature("item_id").mch
        table = dict(name="t_item_id", embedding_dim=DIM, num_embeddings=ROWS,
                     feature_names=["item_id", "hist_item_id"])
        if bags:
            ec = EmbeddingBagCollection(tables=[EmbeddingBagConfig(**table)], device=device)
        else:
            ec = EmbeddingCollection(tables=[EmbeddingConfig(**table)], device=device)

        class Root(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mc = build_managed_collection(ec, {"t_item_id": cfg}, device, return_remapped_features=True)
                self.dense = nn.Linear(DIM, 1, device=device)  # DMP wraps the dense part in DDP

            def forward(self, kjt):
                return self.mc(kjt)

        torch.manual_seed(0)
        return Root(), cfg


def _check(rank: int, world_size: int, bags: bool) -> dict:
    import torch
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from launch.sharding import ShardingConfig, build_sharders, build_topology, embedding_tables, plan, shard_model
    from modules.managed_collision import build_mch_module, hash_input_ids
    from tests.dist.parity import gather_full_state

    device = torch.device("cpu")
    model, cfg = _Holder.module(torch.device("meta"), bags)
    tables = embedding_tables(model)
    kind = "ManagedCollisionEmbeddingBagCollection" if bags else "ManagedCollisionEmbeddingCollection"
    assert tables["t_item_id"].module_path == "mc" and tables["t_item_id"].module_type.__name__ == kind
    apply_optimizer_in_backward(torch.optim.SGD, model.mc.parameters(), {"lr": 0.1})
    sharders = build_sharders()
    sharding_plan = plan(model, ShardingConfig(default_sharding_types=["row_wise"]), {},
                         build_topology(world_size, world_size, device), sharders)
    ps = sharding_plan.plan["mc"]["t_item_id"]
    assert ps.sharding_type == "row_wise" and sorted(ps.ranks) == [0, 1]
    offsets = [s.shard_offsets[0] for s in ps.sharding_spec.shards]
    sizes = [s.shard_sizes[0] for s in ps.sharding_spec.shards]
    assert offsets == [0, ROWS // 2] and sizes == [ROWS // 2] * 2
    dmp = shard_model(model, sharding_plan, sharders, device)

    # The reference: one unsharded ZCH per shard (torchrec's rebuild, as its sharder does), fed its block.
    full = build_mch_module("t_item_id", ROWS, cfg, device)
    refs = [full.rebuild_with_output_id_range((o, o + s), offsets + [ROWS], device) for o, s in zip(offsets, sizes)]
    block = -(-cfg.input_hash_size // world_size)

    b = GLOBAL_B // world_size
    mine = slice(rank * b, (rank + 1) * b)
    dmp.train()
    seen_rows = []
    for batch in _global_stream():
        everything = _kjt(batch, slice(0, GLOBAL_B))
        ids = torch.cat([everything["item_id"].values(), everything["hist_item_id"].values()])
        owner = hash_input_ids(ids, cfg.input_hash_size) // block  # [S] the shard each id belongs to
        expected = torch.empty_like(ids)
        for r, ref in enumerate(refs):
            ref.train()
            sel = owner == r
            got = ref({"t_item_id": JaggedTensor(values=ids[sel], lengths=sel.sum().view(1))})["t_item_id"]
            expected[sel] = got.values()
        out, remapped = dmp(_kjt(batch, mine))
        emb, rows = out.wait(), remapped.wait()
        # this rank's ids in `ids` order: its item_id rows, then its hist_item_id rows
        n_items = GLOBAL_B
        want = torch.cat([expected[:n_items][mine], expected[n_items:].view(GLOBAL_B, HIST)[mine].reshape(-1)])
        got = torch.cat([rows["item_id"].values(), rows["hist_item_id"].values()])
        assert torch.equal(got, want), f"rank {rank}: rows {got.tolist()} != reference {want.tolist()}"
        assert bool(((got >= 0) & (got < ROWS)).all())
        owners_mine = torch.cat([owner[:n_items][mine], owner[n_items:].view(GLOBAL_B, HIST)[mine].reshape(-1)])
        lo, hi = torch.tensor(offsets)[owners_mine], torch.tensor(offsets)[owners_mine] + ROWS // 2
        assert bool(((got >= lo) & (got < hi)).all()), "an id left its block's shard"
        state = gather_full_state(dmp)
        if bags:  # pooled: a target's row; the sum of a history's rows
            weight = state["mc._embedding_module.embedding_bags.t_item_id.weight"]
            n = got.numel() - b * HIST
            torch.testing.assert_close(emb["item_id"], weight[got[:n]], atol=1e-6, rtol=0)
            pooled = weight[got[n:]].view(b, HIST, DIM).sum(1)  # [b, D]
            torch.testing.assert_close(emb["hist_item_id"], pooled, atol=1e-6, rtol=0)
        else:
            weight = state["mc._embedding_module.embeddings.t_item_id.weight"]
            lookups = torch.cat([emb["item_id"].values(), emb["hist_item_id"].values()])
            torch.testing.assert_close(lookups, weight[got], atol=1e-6, rtol=0)
        seen_rows.append(got)

    state = gather_full_state(dmp)
    prefix = "mc._managed_collision_collection._managed_collision_modules.t_item_id."
    for name in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts", "_mch_last_access_iter"):
        assert torch.equal(state[prefix + name], torch.cat([getattr(ref, name) for ref in refs])), name

    # ZCH: every hot id holds a row of its own (not its shard's miss row), one row per id.
    hot = torch.tensor(HOT)
    hot_owner = hash_input_ids(hot, cfg.input_hash_size) // block
    dmp.eval()
    _, remapped = dmp(_kjt({"user_id": np.zeros(len(HOT), dtype=np.int64), "item_id": hot.numpy(),
                            "hist_item_id": np.repeat(hot.numpy()[:, None], HIST, 1)}, slice(0, len(HOT))))
    hot_rows = remapped.wait()["item_id"].values()
    miss = torch.tensor(offsets)[hot_owner] + ROWS // 2 - 1
    assert bool((hot_rows != miss).all()) and len(set(hot_rows.tolist())) == len(HOT), hot_rows
    # evaluation: unseen ids read the miss row and the ZCH state does not change
    fresh = np.array([11, 12, 13, 14], dtype=np.int64) * 10**15
    _, remapped = dmp(_kjt({"user_id": np.zeros(4, dtype=np.int64), "item_id": fresh,
                            "hist_item_id": np.repeat(fresh[:, None], HIST, 1)}, slice(0, 4)))
    fresh_rows = remapped.wait()["item_id"].values()
    fresh_miss = torch.tensor(offsets)[hash_input_ids(torch.from_numpy(fresh), cfg.input_hash_size) // block]
    assert torch.equal(fresh_rows, fresh_miss + ROWS // 2 - 1)
    after = gather_full_state(dmp)
    for key, value in state.items():
        if "_managed_collision_modules" in key:
            assert torch.equal(after[key], value), f"evaluation changed {key}"
    return {"hot_rows": hot_rows.tolist(), "distinct_rows": len(set(torch.cat(seen_rows).tolist()))}


@pytest.mark.parametrize("bags", [False, True], ids=["EmbeddingCollection", "EmbeddingBagCollection"])
def test_row_wise_mch_equals_one_unsharded_zch_per_shard(bags: bool) -> None:
    results = run_workers(_check, world_size=2, args=(bags,), timeout_s=240)
    assert results[0]["hot_rows"] == results[1]["hot_rows"]  # both ranks read the same rows of the hot ids
    assert all(r["distinct_rows"] > len(HOT) for r in results)  # cold ids got rows too, not only the miss rows
