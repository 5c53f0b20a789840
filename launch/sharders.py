"""The model's embedding tables as the planner sees them, the sharders, and DistributedModelParallel.

Nothing here knows any zoo entry: tables are found by walking the model for torchrec ``EmbeddingCollection`` /
``EmbeddingBagCollection`` modules, their managed-collision forms (``mapping: mch`` tables, see
:mod:`modules.managed_collision`), or their sharded forms, and every table name is one that
:func:`datasets.schema.table_name` gives (``t_<table>`` or ``t_<table>__<role>``), so a model may hold several
tables of one feature in distinct roles, in one collection or in several (co-trained sub-models).
Planning is :mod:`launch.planning`, plan files :mod:`launch.plan_files`; :mod:`launch.sharding` re-exports all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.mc_embedding import (
    ManagedCollisionEmbeddingCollectionSharder,
    ShardedManagedCollisionEmbeddingCollection,
)
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)

from datasets.schema import parse_table_name

SHARDING_TYPES: tuple[str, ...] = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS: tuple[str, ...] = tuple(k.value for k in EmbeddingComputeKernel)


def check_names(where: str, names: Iterable[str], valid: tuple[str, ...], what: str) -> None:
    """Raises ValueError naming ``where`` when one of ``names`` is not in ``valid`` (and listing ``valid``)."""
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"{where}: unknown {what} {bad}; valid values: {list(valid)}")


# ---------------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableMeta:
    """One embedding table of a model, as the planner sees it.

    Attributes:
        module_path: the owning collection's path in the model (the plan's key), e.g. ``model.emb.ec``.
        module_type: ``EmbeddingCollection``, ``EmbeddingBagCollection`` or their ``ManagedCollision...``
            forms (picks the sharder).
        rows: ``num_embeddings``.
        dim: ``embedding_dim``.
        bytes_per_element: of the table's data type (4 for fp32).
        table: the schema's table the name was made from (``item_id`` for ``t_item_id__attn``).
        role: the table's role (``attn``), None for a plain ``t_<table>``.
    """

    module_path: str
    module_type: type
    rows: int
    dim: int
    bytes_per_element: int
    table: str
    role: Optional[str]


def _configs(m: nn.Module) -> Optional[tuple[list[BaseEmbeddingConfig], type]]:
    # A managed-collision collection is planned and sharded as one module (its inner collection is skipped).
    if isinstance(m, (ManagedCollisionEmbeddingCollection, ManagedCollisionEmbeddingBagCollection)):
        inner = _configs(m._embedding_module)
        assert inner is not None
        return inner[0], type(m)
    if isinstance(m, ShardedManagedCollisionEmbeddingCollection):
        return list(m._embedding_module._table_name_to_config.values()), ManagedCollisionEmbeddingCollection
    if isinstance(m, ShardedManagedCollisionEmbeddingBagCollection):
        return list(m._embedding_module._table_name_to_config.values()), ManagedCollisionEmbeddingBagCollection
    if isinstance(m, EmbeddingCollection):
        return list(m.embedding_configs()), EmbeddingCollection
    if isinstance(m, EmbeddingBagCollection):
        return list(m.embedding_bag_configs()), EmbeddingBagCollection
    # torchrec keeps the unsharded configs of a sharded collection only in this private attribute.
    if isinstance(m, ShardedEmbeddingCollection):
        return list(m._table_name_to_config.values()), EmbeddingCollection
    if isinstance(m, ShardedEmbeddingBagCollection):
        return list(m._table_name_to_config.values()), EmbeddingBagCollection
    return None


def embedding_tables(model: nn.Module) -> dict[str, TableMeta]:
    """Every embedding table of ``model`` by table name, in module order.

    Works on an unsharded model (on any device, ``meta`` included) and on a DistributedModelParallel (its
    sharded collections; module paths then carry DMP's wrapper prefix). Tables of one feature in several
    collections (two co-trained sub-models) are fine as long as their roles differ (``t_item_id__a``,
    ``t_item_id__b``).

    Raises:
        ValueError: two collections hold tables of the same name (planner constraints are keyed by table
            name, so names must be unique in a model), or a table name is not one of
            :func:`datasets.schema.table_name`'s.
    """
    out: dict[str, TableMeta] = {}
    managed: list[str] = []  # paths of managed-collision collections: their inner collection is theirs
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in managed):
            continue
        found = _configs(m)
        if found is None:
            continue
        configs, kind = found
        if kind in (ManagedCollisionEmbeddingCollection, ManagedCollisionEmbeddingBagCollection):
            managed.append(path)
        for c in configs:
            if c.name in out:
                raise ValueError(
                    f"table {c.name!r} appears in both {out[c.name].module_path!r} and {path!r}; table names must"
                    " be unique in a model (give the sub-models' tables distinct roles: table_name(table, role))"
                )
            try:
                table, role = parse_table_name(c.name)
            except ValueError as e:
                raise ValueError(f"module {path!r}: {e} (name tables with datasets.schema.table_name)") from None
            out[c.name] = TableMeta(
                path, kind, c.num_embeddings, c.embedding_dim, DATA_TYPE_NUM_BITS[c.data_type] // 8, table, role
            )
    return out


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's EmbeddingCollection / EmbeddingBagCollection modules (the sharded ones)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)):
            params.extend(m.parameters())
    return params


# ---------------------------------------------------------------------------------------------------- sharders


class CpuEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """torchrec's EmbeddingBagCollection sharder, also admitting row-wise and table-row-wise on CPU.

    torchrec 1.8 offers ``row_wise`` / ``table_row_wise`` for bags only on CUDA, although the sharded module
    and fbgemm's CPU kernels run them on CPU + gloo (tests/dist checks row-wise parity). On CUDA this is
    torchrec's sharder unchanged.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
                if t not in types:
                    types.append(t)
        return types


class ZooManagedCollisionEmbeddingCollectionSharder(ManagedCollisionEmbeddingCollectionSharder):
    """torchrec's ManagedCollisionEmbeddingCollection sharder (row-wise only), with only the compute kernels
    its EmbeddingCollection sharder offers on the device: torchrec 1.8's managed-collision sharders list fused,
    fused_uvm, fused_uvm_caching and key_value on every device, and on CPU the planner's estimator fails on
    the UVM ones."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        offered = self._e_sharder.compute_kernels(sharding_type, compute_device_type)
        return [k for k in super().compute_kernels(sharding_type, compute_device_type) if k in offered]


class CpuManagedCollisionEmbeddingBagCollectionSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """torchrec's ManagedCollisionEmbeddingBagCollection sharder (row-wise), also on CPU.

    Its sharding types are those its bag sharder and torchrec's ManagedCollisionCollectionSharder (row-wise
    only) share; torchrec's bag sharder lacks row-wise on CPU, so this one bags with
    :class:`CpuEmbeddingBagCollectionSharder`. Compute kernels: as
    :class:`ZooManagedCollisionEmbeddingCollectionSharder`.
    """

    def __init__(self, fused_params: Optional[dict[str, Any]] = None) -> None:
        super().__init__(ebc_sharder=CpuEmbeddingBagCollectionSharder(fused_params=fused_params))

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        offered = self._e_sharder.compute_kernels(sharding_type, compute_device_type)
        return [k for k in super().compute_kernels(sharding_type, compute_device_type) if k in offered]


class ZooEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """torchrec's EmbeddingCollection sharder without ``data_parallel``.

    In torchrec 1.8 a data-parallel EmbeddingCollection fails at its first forward when the input KJT carries
    features of other tables (``split_with_sizes expects split_sizes to sum exactly to ...``): its input
    distribution does not select the module's own features. Every zoo batch carries all id features in one
    KJT, so the planner must not pick data-parallel for an EmbeddingCollection (it would, for small tables).
    Asking for it in config fails with the list of supported types. EmbeddingBagCollections keep it.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]


def build_sharders(fused_params: Optional[dict[str, Any]] = None) -> list[ModuleSharder[nn.Module]]:
    """Sharders for EmbeddingCollection and EmbeddingBagCollection, and their managed-collision forms.

    EmbeddingCollection: table_wise, column_wise, row_wise (torchrec's sharder, which admits row-wise on CPU
    already, minus data_parallel: see :class:`ZooEmbeddingCollectionSharder`).
    EmbeddingBagCollection: those plus table_row_wise and table_column_wise, on CPU too.
    ManagedCollisionEmbeddingCollection / ...BagCollection (``mapping: mch`` tables): row_wise, on CPU too
    (torchrec's sharders; each rank's shard holds a ZCH of its own rows).

    Args:
        fused_params: passed to fbgemm's TBE (e.g. ``{"optimizer": EmbOptimType.EXACT_SGD,
            "learning_rate": 0.1}``); None when the optimizer comes from ``apply_optimizer_in_backward``.
    """
    return [
        ZooEmbeddingCollectionSharder(fused_params=fused_params),
        CpuEmbeddingBagCollectionSharder(fused_params=fused_params),
        ZooManagedCollisionEmbeddingCollectionSharder(fused_params=fused_params),
        CpuManagedCollisionEmbeddingBagCollectionSharder(fused_params=fused_params),
    ]


def sharder_for(module_type: type, sharders: Iterable[ModuleSharder[nn.Module]]) -> ModuleSharder[nn.Module]:
    """The sharder of ``module_type`` among ``sharders``.

    Raises:
        ValueError: none of them shards that type (lists the sharders).
    """
    sharders = list(sharders)
    for s in sharders:
        if s.module_type is module_type:
            return s
    raise ValueError(f"no sharder for {module_type.__name__}; sharders: {[type(s).__name__ for s in sharders]}")


# ---------------------------------------------------------------------------------------------------- DMP


def shard_model(
    model: nn.Module,
    sharding_plan: ShardingPlan,
    sharders: list[ModuleSharder[nn.Module]],
    device: torch.device,
    pg: Optional[dist.ProcessGroup] = None,
) -> DistributedModelParallel:
    """Wraps ``model`` in DistributedModelParallel following ``sharding_plan``.

    The model is normally on the meta device: DMP materialises the shards of every table on ``device`` and
    initialises them with the tables' ``init_fn`` (local RNG: seed before calling), materialises and
    initialises the dense parameters (``reset_parameters``), then wraps the dense part in DDP (which
    broadcasts rank 0's dense weights). Apply ``apply_optimizer_in_backward`` before calling this to fuse the
    embedding optimizer into the backward pass.

    Args:
        pg: the process group; None = the default group (which must be initialised).
    """
    if pg is None:
        if not dist.is_initialized():
            raise RuntimeError("shard_model needs a process group: call torch.distributed.init_process_group first")
        pg = dist.GroupMember.WORLD
    assert pg is not None
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=sharding_plan,
        sharders=sharders,
    )
