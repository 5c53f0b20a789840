"""Config of the data section (``data:`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from datasets.schema import IdPolicy, SchemaConfig


@dataclass
class DataConfig:
    """Where the parquet files are and how they are read.

    Attributes:
        schema: column roles, see :mod:`datasets.schema`.
        train_paths: files or glob patterns (sorted after expansion) of training parquet files.
        eval_paths: files or glob patterns of evaluation parquet files (the validation split: mid-run
            evaluations and the best checkpoint are chosen on it).
        test_paths: files or glob patterns of the test split (empty: none); the best checkpoint is evaluated on
            it at the end of the run (``metrics.json`` ``test``).
        batch_size: samples per batch and rank (training and evaluation).
        num_workers: DataLoader worker processes per rank; files' row groups are split across
            ``world_size * max(num_workers, 1)`` readers.
        shuffle: shuffle the order of row groups (per epoch) and rows within a row group (training only).
        seed: seed of that shuffle; the training stream is a pure function of (seed, rank, world size,
            num_workers, step), which is what makes resuming exact.
        id_policy: what to do with ids outside their table: error (default), hash or clip.
        max_sequence_length: keep only the most recent this many behaviours of every sequence column
            (0 = keep all).
        drop_last: exact epochs: drop the last partial global batch (rows not read that epoch, reported)
            instead of padding it.
        meta_path: a converter's meta.json: table sizes come from its ``table_sizes``
            (:func:`datasets.meta.apply_table_sizes`); an id feature may then omit ``num_embeddings`` or set 0.
    """

    schema: SchemaConfig = field(default_factory=SchemaConfig)
    train_paths: list[str] = field(default_factory=list)
    eval_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    batch_size: int = 256
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    id_policy: IdPolicy = IdPolicy.error
    max_sequence_length: int = 0
    drop_last: bool = False
    meta_path: Optional[str] = None
