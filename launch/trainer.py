"""The distributed training loop: meta-device model -> plan -> DMP -> TrainPipelineSparseDist.

Only this package reads the process environment; :func:`run` gets everything else from the config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from datasets.batch import Batch
from datasets.reader import eval_loader, expand_paths, train_loader
from launch import checkpoint, sharding
from launch.config import ConfigError, DenseOptimizer, Device, ExperimentConfig, OptimConfig, SparseOptimizer, dump_config
from launch.metrics import ctr_metrics, gather_rows
from models.registry import ModelSpec


@dataclass
class DistEnv:
    """Where this process sits (read from the environment by :mod:`launch.train`)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def device_for(cfg_device: Device, env: DistEnv) -> torch.device:
    if cfg_device == Device.cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def apply_sparse_optimizer(model: nn.Module, cfg: OptimConfig) -> None:
    """Fuses the sparse optimizer into the embedding tables' backward (torchrec's in-backward optimizer)."""
    params = sharding.embedding_parameters(model)
    if not params:
        return
    table: dict[SparseOptimizer, tuple[type, dict[str, Any]]] = {
        SparseOptimizer.sgd: (torch.optim.SGD, {"lr": cfg.sparse_lr}),
        SparseOptimizer.adagrad: (torch.optim.Adagrad, {"lr": cfg.sparse_lr, "eps": 1e-8}),
        SparseOptimizer.rowwise_adagrad: (RowWiseAdagrad, {"lr": cfg.sparse_lr, "eps": 1e-8}),
        SparseOptimizer.adam: (torch.optim.Adam, {"lr": cfg.sparse_lr}),
    }
    cls, kwargs = table[cfg.sparse]
    apply_optimizer_in_backward(cls, params, kwargs)


def build_optimizer(dmp: DistributedModelParallel, cfg: OptimConfig) -> tuple[CombinedOptimizer, KeyedOptimizerWrapper]:
    """The fused sparse optimizer (already inside DMP) combined with the dense one; returns (combined, dense)."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    table = {
        DenseOptimizer.sgd: lambda ps: torch.optim.SGD(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay),
        DenseOptimizer.adagrad: lambda ps: torch.optim.Adagrad(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay),
        DenseOptimizer.adam: lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay),
    }
    dense = KeyedOptimizerWrapper(dense_params, table[cfg.dense])
    return CombinedOptimizer([dmp.fused_optimizer, dense]), dense


class _CountingIterator:
    """Passes batches through, remembering each one's id fixes (in order) and the last batch (a template).

    The training pipeline fetches up to two batches ahead of the step it trains, so fixes are only counted
    (:meth:`count_next`) once their batch has been trained on.
    """

    def __init__(self, it: Iterator[Batch]) -> None:
        self._it = it
        self.pending: deque[torch.Tensor] = deque()
        self.last: Optional[Batch] = None

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> Batch:
        b = next(self._it)
        self.pending.append(b.id_fixes.cpu())
        self.last = b
        return b

    def count_next(self) -> torch.Tensor:
        """The fixes of the oldest fetched batch not yet counted."""
        return self.pending.popleft()


def _invalid_copy(b: Batch) -> Batch:
    """The same batch with every row marked as padding (for ranks that ran out of evaluation data)."""
    return dataclasses.replace(
        b, weights=torch.zeros_like(b.weights), valid=torch.zeros_like(b.valid), id_fixes=torch.zeros_like(b.id_fixes)
    )


def evaluate(
    dmp: nn.Module,
    cfg: ExperimentConfig,
    env: DistEnv,
    device: torch.device,
    template: Batch,
    caps: Mapping[str, int],
) -> tuple[dict[str, float], torch.Tensor]:
    """Runs the whole evaluation set through the sharded model; every rank takes the same number of steps.

    Returns:
        The metrics (identical on every rank) and this rank's id fixes over the evaluation set.
    """
    batches = iter(eval_loader(cfg.data, env.rank, env.world_size, sequence_caps=caps))
    fixes = torch.zeros(len(cfg.data.schema.id_features), dtype=torch.long)
    logits, labels, groups = [], [], []
    was_training = dmp.training
    dmp.eval()
    last = template
    with torch.no_grad():
        while True:
            b = next(batches, None)
            more = torch.tensor([0 if b is None else 1], dtype=torch.long)
            if dist.is_initialized():
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if int(more) == 0:
                break
            if b is None:
                b = _invalid_copy(last)
            else:
                fixes += b.id_fixes.cpu()
            last = b
            b = b.to(device)
            _, (_, out_logits, out_labels) = dmp(b)
            v = b.valid
            logits.append(out_logits[v].float().cpu())
            labels.append(out_labels[v].float().cpu())
            groups.append(b.group_ids[v].cpu())
    dmp.train(was_training)
    n_tasks = len(cfg.data.schema.labels)
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)  # noqa: E731
    all_logits = gather_rows(cat(logits, (0, n_tasks)).to(device)).cpu()
    all_labels = gather_rows(cat(labels, (0, n_tasks)).to(device)).cpu()
    all_groups = gather_rows(cat(groups, (0,)).long().to(device)).cpu()
    return ctr_metrics(all_logits, all_labels, all_groups, list(cfg.data.schema.labels)), fixes


def data_position(cfg: ExperimentConfig, caps: Mapping[str, int]) -> dict[str, Any]:
    """The settings the training stream is a function of (besides rank and world size): a step count means the
    same batches only under the same ones."""
    d = cfg.data
    return {
        "train_files": expand_paths(d.train_paths),
        "batch_size": d.batch_size,
        "seed": d.seed,
        "shuffle": d.shuffle,
        "num_workers": d.num_workers,
        "max_sequence_length": d.max_sequence_length,
        "sequence_caps": dict(sorted(caps.items())),
    }


def _sum_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu()


def _max_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def _json_safe(x: Any) -> Any:
    """NaN / inf -> None, so that metrics.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


def run(cfg: ExperimentConfig, spec: ModelSpec, resolved: DictConfig, env: DistEnv) -> dict[str, Any]:
    """Trains and evaluates one experiment; returns the metrics (the same dict on every rank).

    The process group must already be initialised (a world of one for a plain single-process run).
    """
    device = device_for(cfg.train.device, env)
    run_dir = Path(cfg.run_dir)
    is_main = env.rank == 0
    schema = cfg.data.schema
    caps = dict(spec.sequence_caps(cfg.model, schema))
    position = data_position(cfg, caps)
    ckpt_dir = run_dir / "checkpoints"
    found = checkpoint.latest(ckpt_dir)
    if found is not None and not cfg.train.resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest: {found.name}) and train.resume=false: use a new run_dir"
            " (or delete its checkpoints) rather than mixing two runs' checkpoints"
        )
    step = 0
    if found is not None:
        meta = checkpoint.read_meta(found)
        try:  # before anything is written
            checkpoint.check_compatible(found, meta, env.world_size, position)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        step = meta.step
    # Open every evaluation file now (footers and columns only), not after all of training.
    eval_loader(cfg.data, env.rank, env.world_size, sequence_caps=caps)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(resolved))
    torch.manual_seed(cfg.train.seed)

    model = spec.build(cfg.model, schema, torch.device("meta"))
    train_module = spec.build_train_module(model, cfg.model)
    apply_sparse_optimizer(train_module, cfg.optim)
    sharders = sharding.build_sharders()
    topology = sharding.build_topology(env.world_size, env.local_world_size, device, cfg.sharding)
    pg = dist.GroupMember.WORLD if dist.is_initialized() else None
    plan = sharding.plan(train_module, cfg.sharding, spec.default_constraints(cfg.model, schema), topology, sharders, pg)
    torch.manual_seed(cfg.train.seed + env.rank)  # per-rank table initialisation
    dmp = sharding.shard_model(train_module, plan, sharders, device)
    plan_text = sharding.plan_table(plan, dmp)
    if is_main:
        sharding.write_plan(run_dir, plan, plan_text)
    optimizer, dense_optimizer = build_optimizer(dmp, cfg.optim)

    n_id = len(schema.id_features)
    train_fixes = torch.zeros(n_id, dtype=torch.long)  # this rank's, over trained batches
    if found is not None:
        # Dense optimizer state is created lazily at the first step: create it (a zero-gradient step) so that
        # the checkpoint's state can be loaded into it in place; the load then overwrites it and the weights.
        dense_optimizer.init_state()
        dense_optimizer.zero_grad(set_to_none=True)
        state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
        meta = checkpoint.load(found, state, position)  # also restores this rank's RNG state
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        if is_main:  # the checkpoint holds the sum over ranks: carry it on rank 0 only
            train_fixes += torch.tensor(meta.id_fixes or [0] * n_id, dtype=torch.long)
            print(f"[train] resumed from {found} at step {step}", flush=True)
    else:
        torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)  # dropout stream of this rank

    writer = SummaryWriter(str(run_dir / "tb")) if is_main else None
    if writer is not None:
        writer.add_text("sharding_plan", "```\n" + plan_text + "\n```", step)

    def save_checkpoint(at: int) -> None:
        state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
        fixes = _sum_ranks(train_fixes.clone(), device)
        gbs = cfg.data.batch_size * env.world_size
        meta = checkpoint.CheckpointMeta(at, env.world_size, at * gbs, fixes.tolist(), position)
        checkpoint.save(ckpt_dir, at, state, meta, cfg.train.keep_checkpoints)

    def log_eval(m: dict[str, float], at: int) -> None:
        if writer is not None:
            for k in ("auc", "gauc", "logloss"):
                writer.add_scalar(f"eval/{k}", m[k], at)

    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not (is_main and cfg.train.progress_bar), desc="train")
    train_time = 0.0
    steps_run = 0
    losses: list[float] = []
    template: Optional[Batch] = None
    dmp.train()
    while step < cfg.train.max_steps:
        # One segment runs up to the next evaluation (or the end). Its stream holds exactly the segment's
        # batches, so the pipeline, which reads two batches ahead, never reads (or fails on) a batch it will not
        # train on; after an evaluation the pipeline and stream are rebuilt from the step count, which is exact
        # because the stream is a pure function of it (torchrec's pipeline cannot be re-attached over batches
        # whose input distribution already ran).
        every = cfg.train.eval_every
        end = min(cfg.train.max_steps, (step // every + 1) * every) if every else cfg.train.max_steps
        loader = train_loader(cfg.data, env.rank, env.world_size, start_step=step, sequence_caps=caps)
        stream = _CountingIterator(itertools.islice(iter(loader), end - step))
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
        while step < end:
            t0 = time.perf_counter()
            loss, _, _ = pipeline.progress(stream)
            loss_value = float(loss)
            train_time += time.perf_counter() - t0
            train_fixes += stream.count_next()
            step += 1
            steps_run += 1
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if writer is not None and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
                writer.add_scalar("train/loss", loss_value, step)
                samples_per_s = cfg.data.batch_size * env.world_size * steps_run / max(train_time, 1e-9)
                writer.add_scalar("train/samples_per_s", samples_per_s, step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                save_checkpoint(step)
        pipeline.detach()
        template = stream.last or template
        if step < cfg.train.max_steps:  # a mid-run evaluation
            m, _ = evaluate(dmp, cfg, env, device, template, caps)
            log_eval(m, step)
            dmp.train()
    bar.close()
    if cfg.train.checkpoint_at_end and steps_run > 0:
        save_checkpoint(step)
    if template is None:  # resumed at max_steps: fetch one batch as the shape template for padding
        template = next(iter(train_loader(cfg.data, env.rank, env.world_size, sequence_caps=caps)))
    eval_metrics, eval_fixes = evaluate(dmp, cfg, env, device, template, caps)
    log_eval(eval_metrics, step)

    global_bs = cfg.data.batch_size * env.world_size
    t = _max_ranks(torch.tensor([train_time], dtype=torch.float64), device)
    train_total = _sum_ranks(train_fixes, device)
    eval_total = _sum_ranks(eval_fixes, device)
    metrics: dict[str, Any] = {
        "model": spec.name,
        "auc": eval_metrics["auc"],
        "gauc": eval_metrics["gauc"],
        "logloss": eval_metrics["logloss"],
        "samples_per_s": global_bs * steps_run / float(t) if steps_run else float("nan"),
        "steps": step,
        "steps_this_run": steps_run,
        "world_size": env.world_size,
        "final_train_loss": losses[-1] if losses else float("nan"),
        "first_train_loss_this_run": losses[0] if losses else float("nan"),
        "eval": eval_metrics,
        "id_policy": cfg.data.id_policy.value,
        # ids the reader rewrote (hash / clip policies) in trained batches over the whole run, and in evaluation
        "id_fixes": {f.name: int(n) for f, n in zip(schema.id_features, train_total)},
        "id_fixes_eval": {f.name: int(n) for f, n in zip(schema.id_features, eval_total)},
        "run_dir": str(run_dir.resolve()),
    }
    metrics = _json_safe(metrics)
    if writer is not None:
        if steps_run:
            writer.add_scalar("train/samples_per_s", metrics["samples_per_s"], step)
        writer.close()
    if is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
