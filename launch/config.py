"""Experiment configs: typed dataclasses, YAML files composed with ``includes``, strict OmegaConf merging.

An experiment file names the files it builds on, in order, then adds or overrides keys::

    includes: [../datasets/synthetic_small.yaml, ../models/din.yaml]
    train: {max_steps: 200}

``imports: [package.module, ...]`` (top level) imports modules that register zoo entries defined outside
``models/`` (a user's own package) before ``model.name`` is looked up. ``model.name`` selects the zoo entry; its
``ModelSpec.config_cls`` validates the ``model`` section. Command-line overrides (``key.sub=value``) are merged
last. Unknown keys are errors listing the valid keys of their section.
"""

from __future__ import annotations

import enum
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from datasets.config import DataConfig
from datasets.meta import apply_table_sizes
from launch.optim import DenseOptimizer, OptimConfig, SparseOptimizer, check_support  # noqa: F401 (re-exported)
from launch.sharding import ShardingConfig
from models.registry import ModelSpec, get_spec


class Device(enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        max_steps: optimizer steps (every rank takes the same number) when ``epochs`` is 0.
        epochs: train this many exact epochs instead (every training row read once per epoch on any number of
            ranks: ``datasets.reader.steps_per_epoch``; ``data.drop_last`` drops or pads the last partial batch).
        eval_every: evaluate the validation split every this many steps (0: only at the end; the end always
            evaluates).
        evals_per_epoch: with ``epochs``, also evaluate this many times per epoch, evenly spaced (the official
            DARE protocol validates 4 times per epoch).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end when ``checkpoint_at_end``).
        checkpoint_at_end: write a checkpoint after the last step.
        keep_checkpoints: complete checkpoints kept in ``<run_dir>/checkpoints`` (older ones are deleted).
        resume: continue from the newest complete checkpoint in ``<run_dir>/checkpoints`` when there is one.
        log_every: TensorBoard scalars every this many steps.
        seed: seeds dense initialisation and dropout; the data order has its own seed (``data.seed``).
        device: ``cpu`` or ``cuda`` (each rank takes ``cuda:<LOCAL_RANK>``); the backend follows (gloo, or
            nccl with gloo for CPU tensors).
        progress_bar: tqdm bar on rank 0.
    """

    max_steps: int = 100
    epochs: int = 0
    eval_every: int = 0
    evals_per_epoch: int = 0
    checkpoint_every: int = 0
    checkpoint_at_end: bool = True
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10
    seed: int = 0
    device: Device = Device.cpu
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Evaluation and the best checkpoint.

    Attributes:
        best_metric: the validation metric that picks the best checkpoint (None: the entry's
            ``ModelSpec.select_metric``, ``auc`` for CTR entries).
        best_mode: ``max``, ``min`` or ``auto`` (``min`` for metrics named ``*loss*``, else ``max``).
        keep_best: write the best checkpoint to ``<run_dir>/best`` whenever validation improves; the test split
            (``data.test_paths``) is evaluated on it at the end.
        ks: cut-offs K of Recall@K and NDCG@K (the ``ranking`` metric set).
    """

    best_metric: Optional[str] = None
    best_mode: str = "auto"
    keep_best: bool = True
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class ExperimentConfig:
    """The whole experiment; each component receives only its own section.

    Attributes:
        run_dir: where the resolved config, plan, TensorBoard events, checkpoints and metrics go.
        imports: modules imported before the entry is looked up (entries registered outside ``models/``).
        model: the zoo entry's config (its dataclass is chosen by ``model.name``).
        data: the data section.
        train: the training loop.
        optim: optimizers.
        eval: evaluation metrics and the best checkpoint.
        sharding: sharding constraints and plan reuse.
    """

    run_dir: str = "runs/default"
    imports: list[str] = field(default_factory=list)
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: includes itself (cycle {' -> '.join(str(p) for p in seen + (path,))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    includes = raw.pop("includes", [])
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create()
    for inc in includes:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(inc), seen + (path,)))
    return OmegaConf.merge(merged, raw)


def _valid_keys(schema: DictConfig, full_key: str) -> tuple[str, list[str]]:
    """Section name and its valid keys for an unknown ``full_key`` like ``model.foo`` or ``train.x``."""
    parts = [p for p in str(full_key).split(".") if p]
    node: Any = schema
    section = []
    for p in parts[:-1]:
        if isinstance(node, DictConfig) and p in node:
            node = node[p]
            section.append(p)
        else:
            break
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return ".".join(section) or "<top level>", [str(k) for k in keys]


def _strict_merge(schema: DictConfig, *others: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(schema, *others)
    except ConfigKeyError as e:
        section, keys = _valid_keys(schema, getattr(e, "full_key", "") or "")
        raise ConfigError(
            f"unknown config key '{e.full_key}' in section '{section}'; valid keys: {', '.join(keys)}"
        ) from None
    except OmegaConfBaseException as e:  # its first line says what; the rest repeats full_key and type names
        what = str(e.msg if hasattr(e, "msg") else e).strip().splitlines()[0]
        raise ConfigError(f"invalid config value at '{getattr(e, 'full_key', '?')}': {what}") from None
    except (TypeError, ValueError) as e:  # e.g. a list where the schema has a mapping
        raise ConfigError(f"config does not fit the schema: {e}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, ModelSpec, DictConfig]:
    """Loads an experiment.

    Args:
        path: experiment YAML (may include other YAML files).
        overrides: ``key.sub=value`` strings merged last.

    Returns:
        The plain-dataclass config (``cfg.model`` is the entry's config dataclass), the entry's spec, and the
        resolved DictConfig (what is written to the run directory).
    """
    user = _read_yaml(Path(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    if overrides:
        try:
            user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides)))
        except Exception as e:  # YAML parse errors of values, incompatible containers
            raise ConfigError(f"bad override in {list(overrides)}: {e}") from None
    imports = OmegaConf.select(user, "imports", default=[]) or []
    for module in [imports] if isinstance(imports, str) else list(imports):
        try:  # entries defined outside models/ (a user's own package, the tests' tiny entries) register on import
            importlib.import_module(str(module))
        except Exception as e:  # an import error of the user's module: name it
            raise ConfigError(f"{path}: imports: cannot import {module!r}: {type(e).__name__}: {e}") from None
    name = OmegaConf.select(user, "model.name")
    if name is None:
        raise ConfigError(f"{path}: missing model.name (pick a zoo entry, e.g. include configs/models/din.yaml)")
    try:
        spec = get_spec(str(name))
    except KeyError as e:
        raise ConfigError(f"{path}: {e.args[0]}") from None
    schema = OmegaConf.structured(ExperimentConfig)
    schema.model = OmegaConf.structured(spec.config_cls)
    merged = _strict_merge(schema, user)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    assert isinstance(cfg, ExperimentConfig)
    try:
        cfg.data.schema = apply_table_sizes(cfg.data.schema, cfg.data.meta_path)
        cfg.data.schema.validate()
    except ValueError as e:
        raise ConfigError(f"{path}: data.schema: {e}") from None
    return cfg, spec, merged


def validate_experiment(cfg: ExperimentConfig, spec: ModelSpec, plan_device: Optional[str] = None) -> None:
    """Checks what needs the model before any process group exists: it builds on the meta device, and the
    sharding constraints and sequence caps name its tables and the data's sequence groups.

    Args:
        plan_device: check the fused optimizers for this device instead of ``train.device`` and do not ask for
            one on this host (dry-run planning for another cluster, ``launch.plan_cluster``).

    Raises:
        ConfigError: naming the section and what was expected.
    """
    from torchrec.modules.mc_embedding_modules import BaseManagedCollisionEmbeddingCollection

    from launch.optim import dense_groups, replicated, table_parameters
    from launch.sharding import embedding_tables, merge_constraints, plan_from_json

    schema = cfg.data.schema
    try:
        model = spec.build(cfg.model, schema, torch.device("meta"))
        train_module = spec.build_train_module(model, cfg.model)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model ({spec.name}) does not fit data.schema: {e}") from None
    tables = embedding_tables(train_module)
    try:
        cfg.sharding.validate()
        merge_constraints(spec.default_constraints(cfg.model, schema), cfg.sharding, tables)
    except ValueError as e:
        raise ConfigError(f"sharding: {e}") from None
    keys = [k for k, t in cfg.sharding.tables.items() if t.precision not in (None, "fp32")]
    try:
        if keys and replicated(cfg.optim, tables):
            raise ValueError(
                f"sharding.tables {keys} set a precision, but optim.sparse=replicated_adam trains fp32 tables"
                " replicated under torch.optim.Adam (no sharding plan): drop the precision or use a fused sparse"
                " optimizer"
            )
        managed = [n for n, t in tables.items() if issubclass(t.module_type, BaseManagedCollisionEmbeddingCollection)]
        if managed and replicated(cfg.optim, tables):
            raise ValueError(
                f"tables {managed} use mapping: mch, but optim.sparse=replicated_adam replicates every table under"
                " DDP, where each rank would keep its own ZCH (rows differ across ranks): use a fused sparse optimizer"
            )
        check_support(cfg.optim, tables, plan_device or cfg.train.device.value)
        table_params = {id(p) for p in table_parameters(train_module).values()}
        dense_groups([n for n, p in train_module.named_parameters() if id(p) not in table_params], cfg.optim)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
    if plan_device is None and cfg.train.device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device on this host; use train.device=cpu")
    if cfg.eval.best_mode not in ("auto", "max", "min"):
        raise ConfigError(f"eval.best_mode must be auto, max or min, got {cfg.eval.best_mode!r}")
    from launch.metrics import METRIC_SETS, MetricOptions

    if spec.metrics not in METRIC_SETS:
        raise ConfigError(f"model ({spec.name}) names metric set {spec.metrics!r}; known: {sorted(METRIC_SETS)}")
    try:
        options = MetricOptions(ks=list(cfg.eval.ks))
    except ValueError as e:
        raise ConfigError(f"eval.ks: {e}") from None
    from launch.evaluation import metric_names, spec_task_names

    metric = cfg.eval.best_metric or spec.select_metric
    names = metric_names(spec.metrics, spec_task_names(spec, cfg.model, schema), options)
    if metric not in names:
        source = "eval.best_metric" if cfg.eval.best_metric else f"model ({spec.name}) select_metric"
        raise ConfigError(
            f"{source} {metric!r} is not computed by the {spec.metrics!r} metric set of model ({spec.name}); it"
            f" computes {names}"
        )
    groups = schema.sequence_groups()
    try:
        caps = spec.sequence_caps(cfg.model, schema)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model ({spec.name}) does not fit data.schema: {e}") from None
    unknown = sorted(set(caps) - set(groups))
    if unknown:
        raise ConfigError(f"model ({spec.name}) caps sequence groups {unknown}; data.schema has {sorted(groups)}")
    t, d = cfg.train, cfg.data
    checks = [
        ("train.max_steps", t.max_steps, 1), ("train.log_every", t.log_every, 1),
        ("train.epochs", t.epochs, 0), ("train.evals_per_epoch", t.evals_per_epoch, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 1), ("train.eval_every", t.eval_every, 0),
        ("train.checkpoint_every", t.checkpoint_every, 0), ("data.batch_size", d.batch_size, 1),
        ("data.num_workers", d.num_workers, 0), ("data.max_sequence_length", d.max_sequence_length, 0),
    ]
    for name, value, low in checks:
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if not d.train_paths or not d.eval_paths:
        raise ConfigError("data.train_paths and data.eval_paths must each name at least one file or pattern")
    if t.evals_per_epoch and not t.epochs:
        raise ConfigError("train.evals_per_epoch needs train.epochs > 0 (with max_steps use train.eval_every)")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    parent = next((a for a in run_dir.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"run_dir {run_dir} cannot be created: {parent} is not a directory")
    for entry, want_dir in (("checkpoints", True), ("best", True), ("tb", True), ("config.yaml", False),
                            ("plan.txt", False), ("plan.json", False), ("metrics.json", False)):
        path = run_dir / entry
        if path.exists() and path.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a file"
            raise ConfigError(f"run_dir {run_dir}: {path} exists and is not {kind} (the run writes it)")
    plan_path = cfg.sharding.plan_path
    if plan_path:
        p = Path(plan_path)
        if not p.is_file():
            raise ConfigError(f"sharding.plan_path {p}: no such file (a plan.json written by an earlier run)")
        try:
            loaded = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"sharding.plan_path {p}: not a readable plan JSON ({e})") from None
        try:
            if not isinstance(loaded, dict) or not all(isinstance(t, dict) for t in loaded.values()):
                raise ValueError("expected an object: module path -> {table: {sharding_type, compute_kernel, ...}}")
            plan_from_json(loaded)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"sharding.plan_path {p}: not a plan.json written by an earlier run ({e})") from None


def dump_config(resolved: DictConfig) -> str:
    return OmegaConf.to_yaml(resolved, resolve=True)


