import pytest
import torch
from torchrec.distributed.train_pipeline.tracing import Tracer
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from datasets.schema import IdFeature, SchemaConfig, parse_table_name, table_name
from modules.embedding import (
    build_embedding_bag_collection,
    build_embedding_collection,
    concat_jagged,
    group_features_by_table,
    lookup_jagged,
)

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
    ec = build_embedding_collection(SCHEMA, ["item_id", "hist_item_id"], 8, role="attn")
    assert _tables(ec) == {"t_item_id__attn": (20, 8, ["item_id", "hist_item_id"])}
    ebc = build_embedding_bag_collection(SCHEMA, ["hist_category"], 2, role="repr")
    assert _tables(ebc) == {"t_item_category__repr": (5, 2, ["hist_category"])}


def test_table_name_and_its_inverse():
    assert table_name("item_id") == "t_item_id" == SCHEMA.id_feature("hist_item_id").table_name
    assert table_name("item_id", "attn") == "t_item_id__attn"
    assert table_name("user_id") == SCHEMA.id_feature("user_id").table_name  # table defaults to the feature
    for table, role in [("item_id", None), ("item_id", "attn"), ("x", "repr_v2"), ("_private", "r")]:
        assert parse_table_name(table_name(table, role)) == (table, role)
    bad = [("", None), ("a__b", None), ("a_", "attn"), ("a", ""), ("a", "__x"), ("a", "_x"), ("a", "b__c")]
    for table, role in bad:
        with pytest.raises(ValueError):
            table_name(table, role)
    for name in ["item_id", "t_", "t_a__", "t_a___r", "t_a__b__c", "x_item_id"]:
        with pytest.raises(ValueError, match="not a table name"):
            parse_table_name(name)


def test_table_suffix_is_a_deprecated_spelling_of_role():
    with pytest.warns(DeprecationWarning, match="role"):
        ec = build_embedding_collection(SCHEMA, ["item_id"], 8, table_suffix="__attn")
    assert _tables(ec) == {"t_item_id__attn": (20, 8, ["item_id"])}
    with pytest.warns(DeprecationWarning):
        assert list(group_features_by_table(SCHEMA, ["user_id"], table_suffix="")) == ["t_user_id"]
    with pytest.raises(ValueError, match="not both"):
        build_embedding_collection(SCHEMA, ["item_id"], 8, role="attn", table_suffix="__attn")
    with pytest.raises(ValueError, match="__<role>"), pytest.warns(DeprecationWarning):
        build_embedding_collection(SCHEMA, ["item_id"], 8, table_suffix="_attn")


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


def _kjt() -> KeyedJaggedTensor:
    # Batch of 2: item_id [3], [7]; hist_item_id [3, 3], [9]; hist_category [1, 2], [4].
    return KeyedJaggedTensor(
        keys=["user_id", "item_id", "hist_item_id", "hist_category"],
        values=torch.tensor([1, 2, 3, 7, 3, 3, 9, 1, 2, 4]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 1, 2, 1]),
    )


def test_lookup_jagged_returns_the_named_features_jagged():
    ec = build_embedding_collection(SCHEMA, ["item_id", "hist_item_id", "hist_category"], 4)
    e = lookup_jagged(ec, _kjt(), ["hist_item_id", "item_id"])
    assert list(e) == ["hist_item_id", "item_id"] and all(isinstance(j, JaggedTensor) for j in e.values())
    items = ec.embeddings["t_item_id"].weight
    torch.testing.assert_close(e["hist_item_id"].values(), items[[3, 3, 9]])  # [S, D]
    assert e["hist_item_id"].lengths().tolist() == [2, 1]
    torch.testing.assert_close(e["item_id"].values(), items[[3, 7]])  # [B, D]
    with pytest.raises(KeyError):
        lookup_jagged(ec, _kjt(), ["user_id"])  # not a feature of the collection


def test_concat_jagged_concatenates_along_dim_and_traces():
    ec = build_embedding_collection(SCHEMA, ["hist_item_id", "hist_category"], 3)
    e = lookup_jagged(ec, _kjt(), ["hist_item_id", "hist_category"])
    both = concat_jagged([e["hist_item_id"], e["hist_category"]])
    cats = ec.embeddings["t_item_category"].weight
    expected = torch.cat([ec.embeddings["t_item_id"].weight[[3, 3, 9]], cats[[1, 2, 4]]], dim=1)  # [S, 2D]
    torch.testing.assert_close(both.values(), expected)
    assert both.lengths().tolist() == [2, 1]
    with pytest.raises(ValueError):
        concat_jagged([])

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = ec

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            e = lookup_jagged(self.ec, kjt, ["hist_item_id", "hist_category"])
            return concat_jagged([e["hist_item_id"], e["hist_category"]]).values()

    # The way TrainPipelineSparseDist traces a model: the collection is a leaf.
    graph = Tracer(leaf_modules=["ec"]).trace(M())
    assert any(n.op == "call_module" and n.target == "ec" for n in graph.nodes)
    torch.testing.assert_close(torch.fx.GraphModule(M(), graph)(_kjt()), expected)


def test_user_target_history_embedding_jagged_form_matches_the_padded_one():
    from models.common import UserTargetHistoryEmbedding  # the model-side user of these helpers
    from modules.sequence import last_n

    torch.manual_seed(0)
    m = UserTargetHistoryEmbedding(SCHEMA, "user_id", ["item_id"], ["hist_item_id"], 4, history_length=1)
    kjt = _kjt()
    user, target, history = m.embed_jagged(kjt)
    items = m.ec.embeddings["t_item_id"].weight
    torch.testing.assert_close(user, m.ec.embeddings["t_user_id"].weight[[1, 2]])
    torch.testing.assert_close(target, items[[3, 7]])
    torch.testing.assert_close(history.values(), items[[3, 3, 9]])  # every behaviour, not only the last 1
    assert history.lengths().tolist() == [2, 1]
    user2, target2, padded, mask = m(kjt)
    assert torch.equal(user2, user) and torch.equal(target2, target)
    expected, expected_mask = last_n(history.values(), history.lengths(), 1)
    assert torch.equal(padded, expected) and torch.equal(mask, expected_mask)
    torch.testing.assert_close(padded[:, 0], items[[3, 9]])  # the most recent behaviour of each row
