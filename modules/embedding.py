"""torchrec embedding collections built from a data schema (so that the trainer can shard them).

Tables are named ``t_<table>`` after :attr:`datasets.schema.IdFeature.table_name`; features that share a
table in the schema (a target item and the behaviour items) share one table here, listed in its
``feature_names``. A suffix (``__attn``, ``__repr``) lets one model keep several tables per feature, e.g.
DARE's decoupled attention / representation embeddings at different dims.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from datasets.schema import SchemaConfig


def group_features_by_table(
    schema: SchemaConfig, feature_names: Sequence[str], table_suffix: str = ""
) -> dict[str, tuple[list[str], int]]:
    """Table name -> (its features among ``feature_names``, num_embeddings), in schema order.

    Raises:
        KeyError: a feature is not an id feature of the schema.
        ValueError: a feature is listed twice, or features sharing a table disagree on its size.
    """
    dup = sorted({f for f in feature_names if list(feature_names).count(f) > 1})
    if dup:
        raise ValueError(f"features listed more than once: {dup}")
    sizes = schema.table_sizes()
    wanted = {schema.id_feature(name).name for name in feature_names}  # KeyError on unknown names
    tables: dict[str, tuple[list[str], int]] = {}
    for f in schema.id_features:
        if f.name in wanted:
            name = f.table_name + table_suffix
            tables.setdefault(name, ([], sizes[f.table_name]))[0].append(f.name)
    return tables


def build_embedding_collection(
    schema: SchemaConfig,
    feature_names: Sequence[str],
    dim: int,
    device: Optional[torch.device] = None,
    table_suffix: str = "",
) -> EmbeddingCollection:
    """An EmbeddingCollection (one embedding per id, no pooling) over ``feature_names``, all at width ``dim``.

    Looking it up on a KeyedJaggedTensor gives, per feature, a JaggedTensor whose values are ``[B, D]``
    for a scalar feature and ``[sum(lengths), D]`` for a sequence. Keys of the input that are not in
    ``feature_names`` are ignored.

    Args:
        schema: the data schema; gives table sizes and sharing.
        feature_names: id features to embed (the collection's input keys).
        dim: D, the embedding width of every table (torchrec requires one width per EmbeddingCollection).
        device: where the tables are created (``meta`` for the sharding path).
        table_suffix: appended to every table name (``t_item_id`` + ``__attn``).
    """
    tables = [
        EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features)
        for name, (features, rows) in group_features_by_table(schema, feature_names, table_suffix).items()
    ]
    return EmbeddingCollection(tables=tables, device=device)


def build_embedding_bag_collection(
    schema: SchemaConfig,
    feature_names: Sequence[str],
    dim: int,
    device: Optional[torch.device] = None,
    table_suffix: str = "",
    pooling: PoolingType = PoolingType.SUM,
) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection (``pooling`` over each row's ids) over ``feature_names`` at width ``dim``.

    Its output is a KeyedTensor with ``[B, D]`` per feature; for a scalar feature SUM pooling is the
    embedding itself. Arguments as for :func:`build_embedding_collection`.
    """
    tables = [
        EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, pooling=pooling
        )
        for name, (features, rows) in group_features_by_table(schema, feature_names, table_suffix).items()
    ]
    return EmbeddingBagCollection(tables=tables, device=device)
