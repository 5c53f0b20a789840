"""The distributed training loop: meta-device model -> plan -> DMP -> TrainPipelineSparseDist, in phases.

:class:`Trainer` runs ``build`` (model, optimizers, plan, DMP), ``restore`` (the newest checkpoint),
``train_segment`` (steps up to the next evaluation), ``evaluate`` (a split, the entry's metric set),
``checkpoint`` (latest and best) and ``report`` (``metrics.json``). Only :mod:`launch.train` reads the process
environment; the trainer gets everything else from the config.
"""

from __future__ import annotations

import itertools
import json
import math
import resource
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from tqdm import tqdm

from datasets.batch import Batch
from datasets.reader import expand_paths, steps_per_epoch, train_loader
from datasets.schema import IdMapping
from launch import checkpoint, sharding
from launch.schedule import Segment, eval_points, resumed_segment, total_steps
from launch.config import ConfigError, Device, ExperimentConfig, dump_config
from launch.evaluation import Best, evaluate, max_ranks, spec_task_names, split_config, sum_ranks
from launch.metrics import MetricOptions
from launch.optim import apply_sparse_optimizers, build_optimizer, replicated
from models.base import TrainOutput
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
        raise ConfigError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


class IdFixCounter:
    """Ids the reader rewrote (hash / clip policies), per id feature, in the batches this rank trained on.

    The training pipeline fetches batches ahead of the step it trains: :meth:`fetched` queues a batch's
    fixes, :meth:`trained` counts the oldest queued one. The checkpointed state is the sum over ranks
    (:meth:`state_dict` is collective); it is carried on rank 0 after a restore.
    """

    def __init__(self, features: list[str]) -> None:
        self.features = features
        self.total = torch.zeros(len(features), dtype=torch.long)
        self._pending: deque[torch.Tensor] = deque()

    def fetched(self, batch: Batch) -> None:
        self._pending.append(batch.id_fixes.cpu())

    def trained(self) -> None:
        self.total += self._pending.popleft()

    def reset_pending(self) -> None:
        self._pending.clear()

    def state_dict(self, device: torch.device) -> dict[str, list[int]]:
        return {"id_fixes": sum_ranks(self.total.clone(), device).tolist()}

    def load_state_dict(self, state: Optional[list[int]], is_main: bool) -> None:
        if state is not None and is_main:
            self.total += torch.tensor(state, dtype=torch.long)

    def by_feature(self, device: torch.device) -> dict[str, int]:
        return {f: int(n) for f, n in zip(self.features, sum_ranks(self.total.clone(), device))}


class _Counting:
    """Passes batches through, queueing each one's id fixes and keeping the last (a shape template)."""

    def __init__(self, it: Iterator[Batch], fixes: IdFixCounter) -> None:
        self._it = it
        self._fixes = fixes
        self.last: Optional[Batch] = None

    def __iter__(self) -> "_Counting":
        return self

    def __next__(self) -> Batch:
        b = next(self._it)
        self._fixes.fetched(b)
        self.last = b
        return b


def _json_safe(x: Any) -> Any:
    """NaN / inf -> None, so that metrics.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


class Trainer:
    """One experiment on this rank; the process group must already exist (a world of one for a plain run)."""

    def __init__(self, cfg: ExperimentConfig, spec: ModelSpec, resolved: DictConfig, env: DistEnv) -> None:
        self.cfg, self.spec, self.resolved, self.env = cfg, spec, resolved, env
        self.device = device_for(cfg.train.device, env)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.best_dir = self.run_dir / "best"
        self.is_main = env.rank == 0
        self.schema = cfg.data.schema
        self.caps = dict(spec.sequence_caps(cfg.model, self.schema))
        self.total = total_steps(cfg, env.world_size)
        self.points = eval_points(cfg, env.world_size, self.total)
        self.position = self.data_position()
        self.options = MetricOptions(ks=list(cfg.eval.ks))
        self.tasks = spec_task_names(spec, cfg.model, self.schema)
        metric = cfg.eval.best_metric or spec.select_metric
        mode = cfg.eval.best_mode if cfg.eval.best_mode != "auto" else ("min" if "loss" in metric else "max")
        self.best = Best(metric, mode)
        self.fixes = IdFixCounter([f.name for f in self.schema.id_features])
        self.step = 0
        self.segment = Segment()  # where the training stream begins (moved on by a resume on another world size)
        self.samples_seen = 0
        self.steps_run = 0
        self.train_time = 0.0
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.writer: Optional[SummaryWriter] = None

    # ------------------------------------------------------------------------------------------ phases

    def data_position(self) -> dict[str, Any]:
        """The settings the training stream is a function of (besides rank and world size): a step count means
        the same batches only under the same ones."""
        d = self.cfg.data
        return {
            "train_files": expand_paths(d.train_paths),
            "batch_size": d.batch_size,
            "seed": d.seed,
            "shuffle": d.shuffle,
            "num_workers": d.num_workers,
            "max_sequence_length": d.max_sequence_length,
            "sequence_caps": dict(sorted(self.caps.items())),
            **({"epochs": self.cfg.train.epochs, "drop_last": d.drop_last} if self.cfg.train.epochs else {}),
        }

    def check_resumable(self) -> Optional[Path]:
        """The checkpoint to resume from (None: a fresh run); refuses another run's checkpoints before writing."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"run_dir {self.run_dir} exists and is not a directory")
        try:
            found = checkpoint.latest(self.ckpt_dir)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        if found is not None and not self.cfg.train.resume:
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints (latest: {found.name}) and train.resume=false: use a new"
                " run_dir (or delete its checkpoints) rather than mixing two runs' checkpoints"
            )
        if found is not None:
            meta = checkpoint.read_meta(found)
            try:
                checkpoint.check_compatible(found, meta, self.env.world_size, self.position,
                                            elastic=bool(self.cfg.train.epochs))
            except RuntimeError as e:
                raise ConfigError(str(e)) from None
            mch = [f.name for f in self.schema.id_features if f.mapping is IdMapping.mch]
            if mch and meta.world_size != self.env.world_size:
                raise ConfigError(
                    f"{found} was written by {meta.world_size} ranks, this run has {self.env.world_size}, and id"
                    f" features {mch} use mapping: mch, whose row-wise shards each keep the id map of their own"
                    f" block of ids (it cannot be resharded); resume with {meta.world_size} ranks"
                )
            self.segment = resumed_segment(self.cfg, meta.stream, meta.world_size, meta.step, self.env.world_size)
            self.total = total_steps(self.cfg, self.env.world_size, self.segment)
            self.points = eval_points(self.cfg, self.env.world_size, self.total, self.segment)
        return found

    def build(self) -> None:
        """Model on meta, fused sparse optimizers, plan, DMP, dense optimizers."""
        cfg, spec = self.cfg, self.spec
        torch.manual_seed(cfg.train.seed)
        model = spec.build(cfg.model, self.schema, torch.device("meta"))
        train_module = spec.build_train_module(model, cfg.model)
        settings = apply_sparse_optimizers(train_module, cfg.optim)
        if replicated(cfg.optim, settings):
            # optim.sparse=replicated_adam: no sharder, no plan; DMP wraps the whole model (tables included) in DDP.
            sharders: list = []
            self.plan = ShardingPlan({})
        else:
            sharders = sharding.build_sharders()
            topology = sharding.build_topology(self.env.world_size, self.env.local_world_size, self.device,
                                               cfg.sharding)
            pg = dist.GroupMember.WORLD if dist.is_initialized() else None
            constraints = spec.default_constraints(cfg.model, self.schema)
            try:
                self.plan = sharding.plan(train_module, cfg.sharding, constraints, topology, sharders, pg)
            except ValueError as e:  # a plan file that does not fit the model or the world, an unknown table
                raise ConfigError(f"sharding: {e}") from None
        torch.manual_seed(cfg.train.seed + self.env.rank)  # per-rank table initialisation
        self.dmp = sharding.shard_model(train_module, self.plan, sharders, self.device)
        if sharders:
            self.plan_text = sharding.plan_table(self.plan, self.dmp)
        else:
            self.plan_text = (f"every table replicated on all {self.env.world_size} ranks and trained by torch.optim.Adam"
                              f" (optim.sparse=replicated_adam): {sorted(settings)}")
        if self.is_main:
            sharding.write_plan(self.run_dir, self.plan, self.plan_text, tables=self.dmp if sharders else None)
        self.optimizer, self.dense_optimizers = build_optimizer(self.dmp, cfg.optim)

    def _state(self) -> dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def restore(self, found: Optional[Path]) -> None:
        """Loads the newest checkpoint in place (weights, optimizer state, RNG, step, best, id fixes)."""
        if found is None:
            torch.manual_seed(self.cfg.train.seed * 1000 + self.env.rank + 1)  # dropout stream of this rank
            return
        # Dense optimizer state is created lazily at the first step: create it (a zero-gradient step) so that
        # the checkpoint's state can be loaded into it in place; the load then overwrites it and the weights.
        for opt in self.dense_optimizers:
            opt.init_state()
            opt.zero_grad(set_to_none=True)
        state = self._state()
        # DCP reshards the tables and optimizer state onto this run's plan; the RNG state too if the world is the same
        meta = checkpoint.load(found, state, self.position, elastic=bool(self.cfg.train.epochs))
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.step = meta.step
        self.samples_seen = meta.samples_seen
        if meta.world_size != self.env.world_size:  # no RNG state of this rank to carry over: a stream of its own
            torch.manual_seed(self.cfg.train.seed * 1000 + self.env.rank + 1 + 7919 * self.step)
        self.fixes.load_state_dict(meta.id_fixes, self.is_main)
        if meta.best:
            self.best.value, self.best.step = meta.best.get("value"), meta.best.get("step")
        self.history = list(meta.history or [])
        if self.is_main:
            print(f"[train] resumed from {found} at step {self.step}", flush=True)
            if meta.world_size != self.env.world_size:
                left = self.segment.start
                rows = "all" if left.remaining is None else sum(b - a for a, b in left.remaining)
                print(f"[train] written by {meta.world_size} ranks, resumed on {self.env.world_size}: tables and optimizer"
                      f" state resharded; epoch {left.epoch} goes on with the {rows} rows no rank had read"
                      f" ({meta.samples_seen} samples seen), {self.total - self.step} steps to go", flush=True)

    def checkpoint(self, best: bool = False) -> None:
        """Writes the latest checkpoint (collective), or the best one into ``<run_dir>/best``."""
        meta = checkpoint.CheckpointMeta(
            self.step, self.env.world_size, self.samples_seen, self.fixes.state_dict(self.device)["id_fixes"],
            self.position, best=self.best.state(), history=self.history,
            stream=self.segment.to_json() if self.cfg.train.epochs else None,
        )
        if best:
            checkpoint.save(self.best_dir, self.step, {"model": self.dmp.state_dict()}, meta, keep=1)
        else:
            checkpoint.save(self.ckpt_dir, self.step, self._state(), meta, self.cfg.train.keep_checkpoints)

    def train_segment(self, end: int, bar: tqdm) -> None:
        """Trains from ``self.step`` to ``end``.

        The segment's stream holds exactly its batches, so the pipeline, which reads two batches ahead, never
        reads (or fails on) a batch it will not train on; after an evaluation the pipeline and stream are rebuilt
        from the step count, which is exact because the stream is a pure function of it.
        """
        cfg = self.cfg
        epochs = cfg.train.epochs or None
        seg = self.segment
        loader = train_loader(cfg.data, self.env.rank, self.env.world_size, start_step=self.step - seg.base_step,
                              sequence_caps=self.caps, epochs=epochs, stream_start=seg.start if epochs else None)
        stream = _Counting(itertools.islice(iter(loader), end - self.step), self.fixes)
        pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device, execute_all_batches=True)
        self.dmp.train()
        while self.step < end:
            t0 = time.perf_counter()
            out = pipeline.progress(stream)
            loss_value = float(out.loss)
            self.train_time += time.perf_counter() - t0
            self.fixes.trained()
            self.step += 1
            self.steps_run += 1
            self.samples_seen += cfg.data.batch_size * self.env.world_size
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {self.step}")
            self.losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            self._log_train(out, loss_value)
            every = cfg.train.checkpoint_every
            if every and self.step % every == 0 and self.step < self.total:
                self.checkpoint()
        pipeline.detach()
        self.fixes.reset_pending()

    def _log_train(self, out: TrainOutput, loss_value: float) -> None:
        if self.writer is None or not (self.step % self.cfg.train.log_every == 0 or self.step == self.total):
            return
        self.writer.add_scalar("train/loss", loss_value, self.step)
        for name, v in out.loss_parts.items():
            self.writer.add_scalar(f"train/{name}", float(v), self.step)
        sps = self.cfg.data.batch_size * self.env.world_size * self.steps_run / max(self.train_time, 1e-9)
        self.writer.add_scalar("train/samples_per_s", sps, self.step)

    def evaluate(self, paths: Optional[list[str]] = None) -> tuple[dict[str, Any], torch.Tensor]:
        """Evaluates the validation split (or ``paths``) with the entry's metric set."""
        data = self.cfg.data if paths is None else split_config(self.cfg.data, paths)
        return evaluate(self.dmp, data, self.env.rank, self.env.world_size, self.device, self.caps,
                        self.spec.metrics, self.tasks, self.options)

    def _log_eval(self, prefix: str, m: dict[str, Any]) -> None:
        for note in m.get("notes", []):
            if self.is_main:
                print(f"[{prefix}] {note}", flush=True)
        if self.writer is not None:
            for k, v in m.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, self.step)

    def validate(self) -> tuple[dict[str, Any], torch.Tensor]:
        """Evaluates the validation split, records it, and keeps the best checkpoint."""
        m, fixes = self.evaluate()
        self._log_eval("eval", m)
        improved = self.best.update(m, self.step)
        self.history.append({"step": self.step, self.best.metric: m.get(self.best.metric)})
        if improved and self.cfg.eval.keep_best:
            self.checkpoint(best=True)
        return m, fixes

    def test(self) -> Optional[dict[str, Any]]:
        """The best checkpoint (or the final model without one) on ``data.test_paths``; None without a test split."""
        if not self.cfg.data.test_paths:
            return None
        source = "final"
        found = checkpoint.latest(self.best_dir) if self.cfg.eval.keep_best else None
        if found is not None and checkpoint.read_meta(found).step != self.step:
            state = {"model": self.dmp.state_dict()}
            checkpoint.load_model(found, state)
            self.dmp.load_state_dict(state["model"])
            source = f"best (step {checkpoint.read_meta(found).step})"
        elif found is not None:
            source = f"best (step {self.step}, the final model)"
        m, _ = self.evaluate(list(self.cfg.data.test_paths))
        self._log_eval("test", m)
        m["checkpoint"] = source
        return m

    def report(self, final: dict[str, Any], eval_fixes: torch.Tensor, test: Optional[dict[str, Any]]) -> dict[str, Any]:
        gbs = self.cfg.data.batch_size * self.env.world_size
        t = max_ranks(torch.tensor([self.train_time], dtype=torch.float64), self.device)
        eval_total = sum_ranks(eval_fixes, self.device)
        # Peak resident memory of every rank over the whole process (ru_maxrss: KiB on Linux), in MiB.
        rss = torch.zeros(self.env.world_size, dtype=torch.float64)
        rss[self.env.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        rss = sum_ranks(rss, self.device)
        metrics: dict[str, Any] = {
            "model": self.spec.name,
            **{k: final[k] for k in ("auc", "gauc", "logloss") if k in final},
            "samples_per_s": gbs * self.steps_run / float(t) if self.steps_run else float("nan"),
            "steps": self.step,
            "steps_this_run": self.steps_run,
            "samples_seen": self.samples_seen,
            "world_size": self.env.world_size,
            "final_train_loss": self.losses[-1] if self.losses else float("nan"),
            "first_train_loss_this_run": self.losses[0] if self.losses else float("nan"),
            "eval": final,
            "best": self.best.state(),
            "valid_history": self.history,
            "id_policy": self.cfg.data.id_policy.value,
            # ids the reader rewrote (hash / clip policies) in trained batches over the whole run, and in evaluation
            "id_fixes": self.fixes.by_feature(self.device),
            "id_fixes_eval": {f.name: int(n) for f, n in zip(self.schema.id_features, eval_total)},
            "run_dir": str(self.run_dir.resolve()),
            "peak_rss_mib_per_rank": [round(float(x), 1) for x in rss],
        }
        if self.cfg.train.epochs:
            metrics["epochs"] = self.cfg.train.epochs
            metrics["steps_per_epoch"] = steps_per_epoch(self.cfg.data, self.env.world_size)
        if test is not None:
            metrics["test"] = test
        if final.get("notes"):
            metrics["notes"] = final["notes"]
        metrics = _json_safe(metrics)
        if self.writer is not None:
            if self.steps_run:
                self.writer.add_scalar("train/samples_per_s", metrics["samples_per_s"], self.step)
            self.writer.close()
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return metrics

    # --------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Trains and evaluates; returns the metrics (the same dict on every rank)."""
        found = self.check_resumable()
        # Open every data file now (footers and columns only): the training files before the model is built, the
        # evaluation files not after all of training.
        from datasets.reader import eval_batches

        train_loader(self.cfg.data, self.env.rank, self.env.world_size, sequence_caps=self.caps,
                     epochs=self.cfg.train.epochs or None)
        eval_batches(self.cfg.data, self.env.world_size, self.caps)
        if self.cfg.data.test_paths:
            eval_batches(split_config(self.cfg.data, list(self.cfg.data.test_paths)), self.env.world_size, self.caps)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.resolved))
        self.build()
        self.restore(found)
        self.writer = SummaryWriter(str(self.run_dir / "tb")) if self.is_main else None
        if self.writer is not None:
            self.writer.add_text("sharding_plan", "```\n" + self.plan_text + "\n```", self.step)
        bar = tqdm(total=self.total, initial=self.step, disable=not (self.is_main and self.cfg.train.progress_bar),
                   desc="train")
        for point in self.points:
            if point <= self.step:
                continue
            self.train_segment(point, bar)
            if point < self.total:
                self.validate()
        bar.close()
        if self.cfg.train.checkpoint_at_end and self.steps_run > 0:
            self.checkpoint()
        final = self.validate()
        test = self.test()
        return self.report(final[0], final[1], test)


def run(cfg: ExperimentConfig, spec: ModelSpec, resolved: DictConfig, env: DistEnv) -> dict[str, Any]:
    """Trains and evaluates one experiment; returns the metrics (the same dict on every rank)."""
    return Trainer(cfg, spec, resolved, env).run()
