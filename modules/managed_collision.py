"""Managed-collision (ZCH) embedding tables for raw 64-bit ids: torchrec's ``MCHManagedCollisionModule``.

A feature with ``mapping: mch`` (:class:`datasets.schema.MchConfig`) reaches the model with its raw ids. Its
table is looked up through torchrec's ``ManagedCollisionEmbeddingCollection`` (or ``...BagCollection``): a
``ManagedCollisionCollection`` of one ``MCHManagedCollisionModule`` per table remaps every raw id to a row
in ``[0, num_embeddings)`` before the plain collection looks it up. The ZCH keeps the ``num_embeddings - 1``
most valuable ids (by the eviction policy) on rows of their own, sorted in its buffers
``_mch_sorted_raw_ids`` / ``_mch_remapped_ids_mapping`` (plus the policy's ``_mch_counts``,
``_mch_last_access_iter``); every other id reads the last row (the miss row). The buffers are in the
module's ``state_dict`` (sharded: row-wise ``ShardedTensor`` s), so checkpoints save and resume them.
Only training steps (``module.training``) record ids and update the ZCH; evaluation only reads it.

:class:`ManagedCollisionLookup` puts such a collection (and a plain one for the other tables of the same
builder call) behind the plain collection's interface: ``forward(features)`` returns what an
``EmbeddingCollection`` (``{feature: JaggedTensor}``) or an ``EmbeddingBagCollection`` (``KeyedTensor``)
returns, so models do not change. torchrec shards the managed collections row-wise only
(``launch.sharders.build_sharders``); each rank's shard is a ZCH of its own rows, serving the ids of one
block of ``[0, input_hash_size)`` (the input all-to-all routes each id by its block).

Shapes: B batch, S total ids of a feature in the batch, D dim.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from datasets.schema import _GOLDEN, _MIX1, _MIX2, MchConfig, MchEvictionPolicy

_INT64_MAX = 2**63 - 1


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - 2**64 if c > _INT64_MAX else c


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits: torch's ``>>`` is arithmetic on int64."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_torch(ids: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser in torch int64 arithmetic (wrapping): the bits of
    :func:`datasets.schema.splitmix64` as int64.

    Args:
        ids: int64 tensor, any shape.

    Returns:
        int64 tensor, the same shape: the uint64 hash's bits.
    """
    x = ids.to(torch.int64) + _signed(_GOLDEN)
    x = (x ^ _shift_right(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right(x, 31)


def hash_input_ids(ids: torch.Tensor, input_hash_size: int) -> torch.Tensor:
    """torchrec's ``input_hash_func``: raw int64 ids (any value) -> ``[0, input_hash_size)``, uniformly.

    The low 63 bits of splitmix64, mod ``input_hash_size``. Two distinct raw ids collide with probability
    about ``1 / input_hash_size`` (negligible at the default ``2**63 - 1``); the hashed ids never equal int64
    max (the ZCH's empty-slot sentinel).

    Args:
        ids: int64 tensor ``[S]``.
        input_hash_size: the ZCH's input range (> 0, at most ``2**63 - 1``).

    Returns:
        int64 tensor ``[S]`` in ``[0, input_hash_size)``.
    """
    return (splitmix64_torch(ids) & _INT64_MAX) % input_hash_size


def eviction_policy(cfg: MchConfig) -> MCHEvictionPolicy:
    """torchrec's eviction policy object for ``cfg.eviction_policy``."""
    if MchEvictionPolicy(cfg.eviction_policy) is MchEvictionPolicy.lfu:
        return LFU_EvictionPolicy()
    return DistanceLFU_EvictionPolicy(decay_exponent=cfg.decay_exponent)


def build_mch_module(
    table: str, rows: int, cfg: MchConfig, device: Optional[torch.device]
) -> MCHManagedCollisionModule:
    """The ZCH of one table: ``rows`` output rows (the last one is the miss row), options from ``cfg``.

    Args:
        table: the table's name (``t_<table>``).
        rows: the table's ``num_embeddings`` (torchrec's ``zch_size``), >= 2.
        cfg: the feature's validated ``mch`` options.
        device: where its buffers live (``meta`` for the sharding path: the sharder rebuilds them per shard).
    """
    return MCHManagedCollisionModule(
        zch_size=rows,
        device=device if device is not None else torch.device("cpu"),
        eviction_policy=eviction_policy(cfg),
        eviction_interval=cfg.eviction_interval,
        input_hash_size=cfg.input_hash_size,
        input_hash_func=hash_input_ids if cfg.hash_input else None,
        name=table,
        # torchrec 1.8's planner refuses an MC table whose bucket count is not a multiple of the world size (a
        # check meant for MPZCH's uneven buckets). This ZCH has no bucket layout of its own: the sharder
        # rebuilds every shard with one bucket per shard (rebuild_with_output_id_range). 0 passes the check
        # for any world size and is used nowhere else.
        buckets=0,
    )


def build_managed_collection(
    plain: Union[EmbeddingCollection, EmbeddingBagCollection],
    options: dict[str, MchConfig],
    device: Optional[torch.device],
    return_remapped_features: bool = False,
) -> Union[ManagedCollisionEmbeddingCollection, ManagedCollisionEmbeddingBagCollection]:
    """Wraps ``plain`` (every table of which has a ZCH) in torchrec's managed-collision collection.

    Args:
        plain: the collection of the managed tables.
        options: table name -> its ``mch`` options, for every table of ``plain``.
        device: of the ZCH buffers.
        return_remapped_features: the collection's forward returns ``(embeddings, rows)``, ``rows`` the
            KeyedJaggedTensor of the rows the ids were mapped to (else ``(embeddings, None)``).
    """
    if isinstance(plain, EmbeddingCollection):
        configs: Sequence[Union[EmbeddingConfig, EmbeddingBagConfig]] = plain.embedding_configs()
    else:
        configs = plain.embedding_bag_configs()
    mcc = ManagedCollisionCollection(
        {c.name: build_mch_module(c.name, c.num_embeddings, options[c.name], device) for c in configs},
        configs,
    )
    if isinstance(plain, EmbeddingCollection):
        return ManagedCollisionEmbeddingCollection(plain, mcc, return_remapped_features=return_remapped_features)
    return ManagedCollisionEmbeddingBagCollection(plain, mcc, return_remapped_features=return_remapped_features)


@torch.fx.wrap
def _merge_keyed(a: KeyedTensor, b: KeyedTensor) -> KeyedTensor:
    """``a``'s keys then ``b``'s, in one KeyedTensor (values ``[B, sum D]``)."""
    return KeyedTensor(
        keys=a.keys() + b.keys(),
        length_per_key=a.length_per_key() + b.length_per_key(),
        values=torch.cat([a.values(), b.values()], dim=1),
    )


class ManagedCollisionLookup(nn.Module):
    """One builder call's tables: the ``mapping: mch`` ones behind torchrec's managed-collision collection,
    the rest in a plain collection, with the plain collection's output.

    Args:
        managed: ``ManagedCollisionEmbeddingCollection`` or ``...BagCollection`` over the mch tables.
        plain: the collection of the other tables (same kind), or None when every table is mch.
    """

    def __init__(
        self,
        managed: Union[ManagedCollisionEmbeddingCollection, ManagedCollisionEmbeddingBagCollection],
        plain: Optional[Union[EmbeddingCollection, EmbeddingBagCollection]] = None,
    ) -> None:
        super().__init__()
        self.bagged = isinstance(managed, ManagedCollisionEmbeddingBagCollection)
        self.managed = managed
        self.plain = plain
        mc = managed._managed_collision_collection
        self.managed_features: list[str] = [f for c in mc.embedding_configs() for f in c.feature_names]
        self.plain_features: list[str] = []
        if plain is not None:
            configs = plain.embedding_bag_configs() if self.bagged else plain.embedding_configs()
            self.plain_features = [f for c in configs for f in c.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> Union[dict[str, JaggedTensor], KeyedTensor]:
        """Looks ``features`` up (keys of no table here are ignored).

        Args:
            features: ``[B]`` rows of ids; mch features carry raw ids.

        Returns:
            As the plain collection: ``{feature: JaggedTensor}`` with values ``[S, D]`` (EmbeddingCollection),
            or a KeyedTensor with ``[B, D]`` per feature (bags: the mch features' keys first).
        """
        managed = self.managed(features)[0]  # torchrec returns (embeddings, remapped ids or None)
        if self.bagged:
            return managed if self.plain is None else _merge_keyed(managed, self.plain(features))
        out = {name: managed[name] for name in self.managed_features}
        if self.plain is not None:
            rest = self.plain(features)
            for name in self.plain_features:
                out[name] = rest[name]
        return out
