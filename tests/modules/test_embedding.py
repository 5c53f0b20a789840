import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datasets.schema import IdFeature, SchemaConfig
from modules.embedding import build_embedding_bag_collection, build_embedding_collection

SCHEMA = SchemaConfig(
    id_features=[
        IdFeature("user_id", 11),
        IdFeature("item_id", 20, table="item_id"),
        IdFeature("item_category", 5, table="item_category"),
        IdFeature("hist_item_id", 20, sequence=True, table="item_id"),
        IdFeature("hist_category", 5, sequence=True, table="item_category"),
    ]
)


def _tables(collection) -> dict[str, tuple[int, int, list[str]]]:
    configs = (
        collection.embedding_configs()
        if hasattr(collection, "embedding_configs")
        else collection.embedding_bag_configs()
    )
    return {c.name: (c.num_embeddings, c.embedding_dim, list(c.feature_names)) for c in configs}


def test_tables_follow_schema_sharing_and_names():
    ec = build_embedding_collection(SCHEMA, ["hist_category", "item_id", "hist_item_id", "user_id"], 4)
    assert _tables(ec) == {
        "t_user_id": (11, 4, ["user_id"]),
        "t_item_id": (20, 4, ["item_id", "hist_item_id"]),
        "t_item_category": (5, 4, ["hist_category"]),
    }
    ec = build_embedding_collection(SCHEMA, ["item_id", "hist_item_id"], 8, table_suffix="__attn")
    assert _tables(ec) == {"t_item_id__attn": (20, 8, ["item_id", "hist_item_id"])}


def test_lookup_shares_rows_and_ignores_extra_keys():
    ec = build_embedding_collection(SCHEMA, ["item_id", "hist_item_id"], 4)
    kjt = KeyedJaggedTensor(
        keys=["user_id", "item_id", "hist_item_id"],
        values=torch.tensor([1, 2, 3, 7, 3, 3, 9]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 1]),
    )
    e = ec(kjt)
    weight = ec.embeddings["t_item_id"].weight
    assert set(e.keys()) == {"item_id", "hist_item_id"}
    torch.testing.assert_close(e["item_id"].values(), weight[[3, 7]])
    torch.testing.assert_close(e["hist_item_id"].values(), weight[[3, 3, 9]])
    assert e["hist_item_id"].lengths().tolist() == [2, 1]


def test_bag_collection_sum_pools_and_builds_on_meta():
    ebc = build_embedding_bag_collection(SCHEMA, ["user_id", "hist_category"], 3)
    assert _tables(ebc) == {"t_user_id": (11, 3, ["user_id"]), "t_item_category": (5, 3, ["hist_category"])}
    assert all(c.pooling == PoolingType.SUM for c in ebc.embedding_bag_configs())
    kjt = KeyedJaggedTensor(keys=["user_id", "hist_category"], values=torch.tensor([4, 1, 2, 3]), lengths=torch.tensor([1, 3]))
    out = ebc(kjt).to_dict()
    weight = ebc.embedding_bags["t_item_category"].weight
    torch.testing.assert_close(out["hist_category"], weight[[1, 2, 3]].sum(0, keepdim=True))
    meta = build_embedding_collection(SCHEMA, ["user_id"], 3, torch.device("meta"))
    assert meta.embeddings["t_user_id"].weight.is_meta


def test_unknown_or_duplicate_features_are_errors():
    with pytest.raises(KeyError, match="nope"):
        build_embedding_collection(SCHEMA, ["nope"], 4)
    with pytest.raises(ValueError, match="item_id"):
        build_embedding_collection(SCHEMA, ["item_id", "item_id"], 4)
