"""Optimizers: fused sparse optimizers per table (or table role), dense optimizers per named parameter group.

Config (``optim:`` in YAML, :class:`OptimConfig`)::

    optim:
      sparse: adagrad          # the default of every embedding table (fused into the backward)
      sparse_lr: 0.05
      dense: adam              # the default of every other parameter
      dense_lr: 0.001
      weight_decay: 0.0
      tables:                  # per table: a full table name (t_item_id, t_item_id__attn) or a glob (*__attn)
        t_item_id: {optimizer: rowwise_adagrad, lr: 0.1}
        "*__attn": {lr: 0.01}
      dense_groups:            # per named group of dense parameters (globs over train-module parameter names)
        attention: {params: ["model.attention.*"], lr: 0.01, weight_decay: 0.0}

A table takes the entry of its exact name if there is one, else the first glob (in config order) that matches
it, else the defaults; every key must match at least one table. A dense parameter joins the first group
whose patterns match its name (names as in the unsharded train module, e.g. ``model.mlp.layers.0.weight``);
the rest form the ``default`` group. Each group is its own optimizer inside one ``CombinedOptimizer``, so its
state is checkpointed under its name.

Fused optimizers run inside fbgemm's table-batched kernels; which ones exist depends on the device
(:data:`FUSED_SUPPORT`): on CPU fbgemm 1.8 has only SGD and (row-wise) Adagrad, so ``adam`` is refused before
the run starts (exit 2) with what to use instead.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter


class SparseOptimizer(enum.Enum):
    """Fused (in-backward) optimizers for embedding tables."""

    sgd = "sgd"
    adagrad = "adagrad"
    rowwise_adagrad = "rowwise_adagrad"
    adam = "adam"
    # Not fused: the tables are not sharded but replicated on every rank (DDP all-reduces their dense gradients)
    # and trained by torch.optim.Adam, the official DARE code's optimizer. For tables that fit every rank.
    replicated_adam = "replicated_adam"


class DenseOptimizer(enum.Enum):
    sgd = "sgd"
    adagrad = "adagrad"
    adam = "adam"
    adamw = "adamw"


# Which fused optimizers fbgemm-gpu 1.8's table-batched embedding kernels implement, per device type
# (fbgemm_gpu.split_table_batched_embeddings_ops_training: CPU mode accepts EXACT_SGD, EXACT_ADAGRAD,
# EXACT_ROWWISE_ADAGRAD only).
FUSED_SUPPORT: dict[str, tuple[SparseOptimizer, ...]] = {
    "cpu": (SparseOptimizer.sgd, SparseOptimizer.adagrad, SparseOptimizer.rowwise_adagrad),
    "cuda": (SparseOptimizer.sgd, SparseOptimizer.adagrad, SparseOptimizer.rowwise_adagrad, SparseOptimizer.adam),
}


@dataclass
class SparseGroupConfig:
    """Fused optimizer settings of the tables one ``optim.tables`` key names (None: the ``optim`` default).

    Attributes:
        optimizer: the fused optimizer.
        lr: its learning rate.
        eps: epsilon of Adagrad / Adam (default 1e-8).
    """

    optimizer: Optional[SparseOptimizer] = None
    lr: Optional[float] = None
    eps: Optional[float] = None


@dataclass
class DenseGroupConfig:
    """A named group of dense parameters (``optim.dense_groups.<name>``).

    Attributes:
        params: glob patterns over train-module parameter names (``model.attention.*``).
        optimizer: None = ``optim.dense``.
        lr: None = ``optim.dense_lr``.
        weight_decay: None = ``optim.weight_decay``.
    """

    params: list[str] = field(default_factory=list)
    optimizer: Optional[DenseOptimizer] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class OptimConfig:
    """Optimizers: fused sparse optimizers applied in backward to the embedding tables, dense ones for the rest.

    Attributes:
        sparse: default fused optimizer of the embedding tables (CPU: sgd, adagrad, rowwise_adagrad).
        sparse_lr: its learning rate.
        dense: default optimizer of the dense parameters.
        dense_lr: its learning rate.
        weight_decay: default dense weight decay.
        tables: per-table (exact name or glob) overrides of the sparse settings.
        dense_groups: named groups of dense parameters with their own settings.
    """

    sparse: SparseOptimizer = SparseOptimizer.adagrad
    sparse_lr: float = 0.05
    dense: DenseOptimizer = DenseOptimizer.adam
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    tables: dict[str, SparseGroupConfig] = field(default_factory=dict)
    dense_groups: dict[str, DenseGroupConfig] = field(default_factory=dict)


def _strip(name: str) -> str:
    """A parameter name as in the unsharded train module (DMP and DDP wrappers' prefixes removed)."""
    for prefix in ("_dmp_wrapped_module.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def table_settings(cfg: OptimConfig, tables: Iterable[str]) -> dict[str, SparseGroupConfig]:
    """Resolved sparse settings of every table (all fields set).

    Raises:
        ValueError: an ``optim.tables`` key matches no table (the message lists the tables).
    """
    from launch.planning import select_tables

    tables = list(tables)
    chosen = select_tables(cfg.tables, tables, where="optim.tables")
    out: dict[str, SparseGroupConfig] = {}
    for t in tables:
        entry = cfg.tables[chosen[t]] if t in chosen else SparseGroupConfig()
        out[t] = SparseGroupConfig(
            optimizer=SparseOptimizer(entry.optimizer) if entry.optimizer is not None else cfg.sparse,
            lr=entry.lr if entry.lr is not None else cfg.sparse_lr,
            eps=entry.eps if entry.eps is not None else 1e-8,
        )
    return out


def replicated(cfg: OptimConfig, tables: Iterable[str]) -> bool:
    """Whether the tables are replicated and trained by torch Adam (``replicated_adam``) instead of sharded.

    Raises:
        ValueError: only some tables are ``replicated_adam`` (the model's collections are replicated whole).
    """
    settings = table_settings(cfg, tables)
    kinds = {t: s.optimizer is SparseOptimizer.replicated_adam for t, s in settings.items()}
    if any(kinds.values()) and not all(kinds.values()):
        raise ValueError(
            f"replicated_adam must be the optimizer of every table (collections are replicated whole); it is set"
            f" for {sorted(t for t, r in kinds.items() if r)} but not {sorted(t for t, r in kinds.items() if not r)}"
        )
    return bool(kinds) and all(kinds.values())


def check_support(cfg: OptimConfig, tables: Iterable[str], device_type: str) -> None:
    """Fails (ValueError) when a table's fused optimizer does not exist on ``device_type``, naming the table."""
    tables = list(tables)
    if replicated(cfg, tables):
        return
    supported = FUSED_SUPPORT.get(device_type, ())
    for t, s in table_settings(cfg, tables).items():
        if s.optimizer not in supported:
            raise ValueError(
                f"fused sparse optimizer {s.optimizer.value!r} (table {t}) is not implemented by fbgemm-gpu on"
                f" {device_type}; {device_type} supports {[o.value for o in supported]} (cuda also has adam)."
                " For Adam on embeddings on CPU (the official DARE protocol) use optim.sparse=replicated_adam:"
                " tables replicated on every rank and trained by torch.optim.Adam (see README, Parity)"
            )


def _fused_class(s: SparseGroupConfig) -> tuple[type, dict[str, Any]]:
    kind = SparseOptimizer(s.optimizer)
    if kind is SparseOptimizer.sgd:
        return torch.optim.SGD, {"lr": s.lr}
    if kind is SparseOptimizer.adagrad:
        return torch.optim.Adagrad, {"lr": s.lr, "eps": s.eps}
    if kind is SparseOptimizer.rowwise_adagrad:
        return RowWiseAdagrad, {"lr": s.lr, "eps": s.eps}
    return torch.optim.Adam, {"lr": s.lr, "eps": s.eps}


def apply_sparse_optimizers(model: nn.Module, cfg: OptimConfig) -> dict[str, SparseGroupConfig]:
    """Fuses each table's optimizer into its backward (torchrec's in-backward optimizer); returns the settings.

    Call on the unsharded (meta) model before sharding: the sharder reads each table's optimizer class and
    arguments and groups tables with equal settings into one fbgemm kernel.
    """
    params = table_parameters(model)
    settings = table_settings(cfg, params)
    if replicated(cfg, params):  # trained by the dense optimizers (build_optimizer)
        return settings
    for name, param in params.items():
        cls, kwargs = _fused_class(settings[name])
        apply_optimizer_in_backward(cls, [param], kwargs)
    return settings


def table_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Table name -> its weight, over the unsharded EmbeddingCollection / EmbeddingBagCollection modules."""
    out: dict[str, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            out.update({name: e.weight for name, e in m.embeddings.items()})
        elif isinstance(m, EmbeddingBagCollection):
            out.update({name: e.weight for name, e in m.embedding_bags.items()})
    return out


def _dense_factory(kind: DenseOptimizer, lr: float, weight_decay: float) -> Any:
    kind = DenseOptimizer(kind)
    classes = {
        DenseOptimizer.sgd: torch.optim.SGD,
        DenseOptimizer.adagrad: torch.optim.Adagrad,
        DenseOptimizer.adam: torch.optim.Adam,
        DenseOptimizer.adamw: torch.optim.AdamW,
    }
    cls = classes[kind]
    return lambda params: cls(params, lr=lr, weight_decay=weight_decay)


def dense_groups(names: Iterable[str], cfg: OptimConfig) -> dict[str, list[str]]:
    """Group name -> the dense parameter names (as given) it holds; ``default`` takes the rest.

    Raises:
        ValueError: a group's patterns match no parameter, or a group is named ``default``.
    """
    if "default" in cfg.dense_groups:
        raise ValueError("optim.dense_groups: 'default' is the name of the group of the remaining parameters")
    names = list(names)
    groups: dict[str, list[str]] = {g: [] for g in cfg.dense_groups}
    groups["default"] = []
    for n in names:
        short = _strip(n)
        for g, gc in cfg.dense_groups.items():
            if any(fnmatch.fnmatchcase(short, p) for p in gc.params):
                groups[g].append(n)
                break
        else:
            groups["default"].append(n)
    empty = [g for g in cfg.dense_groups if not groups[g]]
    if empty:
        sample = sorted(_strip(n) for n in names)[:8]
        raise ValueError(f"optim.dense_groups {empty} match no dense parameter; parameter names look like {sample}")
    return groups


def build_optimizer(dmp: nn.Module, cfg: OptimConfig) -> tuple[CombinedOptimizer, list[KeyedOptimizerWrapper]]:
    """The fused sparse optimizer (inside DMP) combined with one dense optimizer per group.

    Returns:
        (the combined optimizer, the dense optimizers in group order).
    """
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    parts: list[tuple[str, Any]] = [("fused", dmp.fused_optimizer)]  # type: ignore[attr-defined]
    dense: list[KeyedOptimizerWrapper] = []
    tables = table_parameters(dmp)  # unsharded (replicated) tables only: sharded ones are not collections here
    if tables and replicated(cfg, tables):
        by_id = {id(p): n for n, p in dense_params.items()}
        for t, s in table_settings(cfg, tables).items():  # one torch Adam per table, at its lr
            name = by_id.pop(id(tables[t]))
            opt = KeyedOptimizerWrapper(
                {name: dense_params.pop(name)},
                lambda ps, lr=s.lr, eps=s.eps: torch.optim.Adam(ps, lr=lr, eps=eps, weight_decay=cfg.weight_decay),
            )
            dense.append(opt)
            parts.append((t, opt))
    groups = dense_groups(dense_params, cfg)
    for g, names in groups.items():
        if not names:
            continue
        gc = cfg.dense_groups.get(g, DenseGroupConfig())
        factory = _dense_factory(
            gc.optimizer if gc.optimizer is not None else cfg.dense,
            gc.lr if gc.lr is not None else cfg.dense_lr,
            gc.weight_decay if gc.weight_decay is not None else cfg.weight_decay,
        )
        opt = KeyedOptimizerWrapper({n: dense_params[n] for n in names}, factory)
        dense.append(opt)
        parts.append((g, opt))
    return CombinedOptimizer(parts), dense

