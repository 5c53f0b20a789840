"""torchrec embedding collections built from a data schema (so that the trainer can shard them).

Tables are named by :func:`datasets.schema.table_name`: ``t_<table>``, or ``t_<table>__<role>`` when a model
keeps several tables per feature in distinct roles, e.g. DARE's decoupled attention / representation
embeddings (roles ``attn`` and ``repr``, possibly at different dims). Features that share a table in the
schema (a target item and the behaviour items) share one table here, listed in its ``feature_names``.

Tables of ``mapping: mch`` features (raw 64-bit ids) are looked up through torchrec's managed-collision
collections: the builders then return a :class:`modules.managed_collision.ManagedCollisionLookup`, which
returns what the plain collection would.

Shapes: B batch, S total number of ids of a sequence feature in the batch (sum of its lengths), D dim.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from datasets.schema import IdMapping, MchConfig, SchemaConfig, table_name
from modules.managed_collision import ManagedCollisionLookup, build_managed_collection


def _role_from(role: Optional[str], table_suffix: Optional[str]) -> Optional[str]:
    """The role, from ``role`` or the deprecated ``table_suffix`` (``"__attn"`` means role ``attn``)."""
    if table_suffix is None:
        return role
    if role is not None:
        raise ValueError(f"give role or table_suffix, not both (role={role!r}, table_suffix={table_suffix!r})")
    warnings.warn("table_suffix is deprecated: pass role (table_suffix='__attn' is role='attn')", DeprecationWarning, 3)
    if table_suffix == "":
        return None
    if not table_suffix.startswith("__"):
        raise ValueError(f"table_suffix {table_suffix!r} must be '__<role>'; pass role instead")
    return table_suffix[2:]


def group_features_by_table(
    schema: SchemaConfig,
    feature_names: Sequence[str],
    role: Optional[str] = None,
    *,
    table_suffix: Optional[str] = None,
) -> dict[str, tuple[list[str], int]]:
    """Table name -> (its features among ``feature_names``, num_embeddings), in schema order.

    Args:
        schema: the data schema.
        feature_names: id features of the schema.
        role: the tables' role (``table_name(table, role)``); None for plain ``t_<table>`` names.
        table_suffix: deprecated spelling of ``role``: ``"__attn"`` is ``role="attn"``.

    Raises:
        KeyError: a feature is not an id feature of the schema.
        ValueError: a feature is listed twice, features sharing a table disagree on its size, or the role is
            not a valid role name.
    """
    role = _role_from(role, table_suffix)
    dup = sorted({f for f in feature_names if list(feature_names).count(f) > 1})
    if dup:
        raise ValueError(f"features listed more than once: {dup}")
    sizes = schema.table_sizes()
    wanted = {schema.id_feature(name).name for name in feature_names}  # KeyError on unknown names
    tables: dict[str, tuple[list[str], int]] = {}
    for f in schema.id_features:
        if f.name in wanted:
            name = table_name(f.table or f.name, role)
            tables.setdefault(name, ([], sizes[f.table_name]))[0].append(f.name)
    return tables


def _mch_options(schema: SchemaConfig, tables: dict[str, tuple[list[str], int]]) -> dict[str, MchConfig]:
    """Table name -> ``mch`` options, for the tables (of :func:`group_features_by_table`) of mch features."""
    out = {}
    for name, (features, _) in tables.items():
        f = schema.id_feature(features[0])  # features sharing a table agree (SchemaConfig.validate)
        if f.mapping is IdMapping.mch:
            out[name] = f.mch
    return out


def _collection(
    configs: list, mch: dict[str, MchConfig], device: Optional[torch.device], bags: bool
) -> EmbeddingCollection | EmbeddingBagCollection | ManagedCollisionLookup:
    """A plain collection of ``configs``, or, when some are mch tables, a ManagedCollisionLookup."""
    kind = EmbeddingBagCollection if bags else EmbeddingCollection
    if not mch:
        return kind(tables=configs, device=device)
    managed = build_managed_collection(kind(tables=[c for c in configs if c.name in mch], device=device), mch, device)
    rest = [c for c in configs if c.name not in mch]
    return ManagedCollisionLookup(managed, kind(tables=rest, device=device) if rest else None)


def build_embedding_collection(
    schema: SchemaConfig,
    feature_names: Sequence[str],
    dim: int,
    device: Optional[torch.device] = None,
    role: Optional[str] = None,
    *,
    table_suffix: Optional[str] = None,
) -> EmbeddingCollection | ManagedCollisionLookup:
    """An EmbeddingCollection (one embedding per id, no pooling) over ``feature_names``, all at width ``dim``.

    Looking it up on a KeyedJaggedTensor gives, per feature, a JaggedTensor whose values are ``[B, D]``
    for a scalar feature and ``[S, D]`` for a sequence (see :func:`lookup_jagged`). Keys of the input that
    are not in ``feature_names`` are ignored.

    Args:
        schema: the data schema; gives table sizes and sharing.
        feature_names: id features to embed (the collection's input keys).
        dim: D, the embedding width of every table (torchrec requires one width per EmbeddingCollection).
        device: where the tables are created (``meta`` for the sharding path).
        role: the tables' role: ``"attn"`` names them ``t_<table>__attn``; None: ``t_<table>``.
        table_suffix: deprecated spelling of ``role`` (``"__attn"``).

    Returns:
        An EmbeddingCollection; when some of the tables are of ``mapping: mch`` features, a
        :class:`~modules.managed_collision.ManagedCollisionLookup` with the same output.
    """
    grouped = group_features_by_table(schema, feature_names, _role_from(role, table_suffix))
    tables = [
        EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features)
        for name, (features, rows) in grouped.items()
    ]
    return _collection(tables, _mch_options(schema, grouped), device, bags=False)


def build_embedding_bag_collection(
    schema: SchemaConfig,
    feature_names: Sequence[str],
    dim: int,
    device: Optional[torch.device] = None,
    role: Optional[str] = None,
    pooling: PoolingType = PoolingType.SUM,
    *,
    table_suffix: Optional[str] = None,
) -> EmbeddingBagCollection | ManagedCollisionLookup:
    """An EmbeddingBagCollection (``pooling`` over each row's ids) over ``feature_names`` at width ``dim``.

    Its output is a KeyedTensor with ``[B, D]`` per feature; for a scalar feature SUM pooling is the
    embedding itself (with mch tables: their features' keys first). Other arguments as for
    :func:`build_embedding_collection`.
    """
    grouped = group_features_by_table(schema, feature_names, _role_from(role, table_suffix))
    tables = [
        EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, pooling=pooling
        )
        for name, (features, rows) in grouped.items()
    ]
    return _collection(tables, _mch_options(schema, grouped), device, bags=True)


def lookup_jagged(
    collection: EmbeddingCollection | ManagedCollisionLookup, features: KeyedJaggedTensor, feature_names: Sequence[str]
) -> dict[str, JaggedTensor]:
    """Looks ``feature_names`` up in ``collection`` and returns their jagged embeddings.

    The collection runs once (one lookup, one all-to-all once sharded) over every key it has; this picks
    ``feature_names`` from its output. Works under ``torch.fx`` tracing with the collection as a leaf (the
    way TrainPipelineSparseDist traces a model).

    Args:
        collection: an EmbeddingCollection (e.g. from :func:`build_embedding_collection`), or its sharded form.
        features: ``[B]`` rows of ids; keys the collection does not have are ignored.
        feature_names: features to return, each one of the collection's features.

    Returns:
        feature -> JaggedTensor with ``values()`` ``[S, D]`` (``[B, D]`` for a scalar feature: one id per row)
        and ``lengths()`` ``[B]``, rows in batch order, each row's ids in input order (oldest first).
    """
    out = collection(features)
    return {name: out[name] for name in feature_names}


def concat_jagged(parts: Sequence[JaggedTensor]) -> JaggedTensor:
    """Concatenates aligned jagged embeddings along D (e.g. item id ++ category for every behaviour).

    The parts must have equal lengths per row (features of one sequence group); the lengths of the first
    are used, without a check (no data-dependent control flow, so that it traces with ``torch.fx``).

    Args:
        parts: JaggedTensors with values ``[S, D_i]`` and lengths ``[B]``.

    Returns:
        A JaggedTensor with values ``[S, sum_i D_i]`` and the first part's lengths ``[B]``.
    """
    if not parts:
        raise ValueError("concat_jagged needs at least one part")
    values = torch.cat([p.values() for p in parts], dim=-1)  # [S, sum_i D_i]
    return JaggedTensor(values=values, lengths=parts[0].lengths())
