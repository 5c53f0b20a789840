"""Per-table precision (``sharding.tables.<key>.precision``): which data types torchrec trains, and applying
one to a model's tables before planning.

What torchrec 1.8 / fbgemm-gpu 1.8 do with ``EmbeddingBagConfig.data_type`` / ``EmbeddingConfig.data_type``:

* ``FP16``: the unsharded collections make the table's weight fp16; the planner's storage estimate uses the
  weight's element size (2 bytes); the sharded kernels (``fused``: fbgemm's table-batched embeddings with
  ``weights_precision=FP16``; ``dense`` for data-parallel) keep the rows in fp16 on CPU and CUDA, apply the
  fused optimizer to them (stochastic rounding) and return fp32 embeddings. Trained here.
* ``INT8``: the training kernel allocates int8 rows with a per-row scale and bias (``dim + 8`` bytes), which
  torchrec's fused optimizer view of the shard does not expect: DMP fails building the module ("Shard tensor
  size does not match with metadata.shard_lengths"). int8 tables are for inference (``torchrec.quant``'s
  quantized collections, after training), so config asks for it are refused with the supported list.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.types import DataType

# The precisions training supports, by config name.
TRAINABLE_PRECISIONS: dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def data_types(selected: Mapping[str, str], precisions: Mapping[str, Optional[str]]) -> dict[str, DataType]:
    """Table -> DataType, for the tables whose config key states a precision.

    Args:
        selected: table -> the ``sharding.tables`` key that selects it (:func:`launch.planning.select_tables`).
        precisions: key -> its ``precision`` (None = the table's own).

    Raises:
        ValueError: a precision torchrec cannot train (``int8``), naming the key and its tables.
    """
    out: dict[str, DataType] = {}
    for table, key in selected.items():
        name = precisions.get(key)
        if name is None:
            continue
        if name not in TRAINABLE_PRECISIONS:
            hit = [t for t, k in selected.items() if k == key]
            raise ValueError(
                f"sharding.tables.{key}.precision={name} (tables {hit}): torchrec trains embedding tables in"
                f" {' or '.join(TRAINABLE_PRECISIONS)} only ({name} tables are inference-only, torchrec.quant);"
                f" supported: {list(TRAINABLE_PRECISIONS)}"
            )
        out[table] = TRAINABLE_PRECISIONS[name]
    return out


def apply_precisions(model: nn.Module, precisions: Mapping[str, DataType]) -> None:
    """Sets each named table's ``data_type`` in its collection's config and casts its weight to match, in place.

    On the meta device this allocates nothing: the planner reads the weight's element size (its storage
    estimate) and DMP allocates the shards in the config's data type. Parameters keep their identity (the
    cast replaces their data), so fused optimizers applied before (``apply_optimizer_in_backward``) stay
    attached.

    Args:
        model: an unsharded model (its EmbeddingCollection / EmbeddingBagCollection modules).
        precisions: table name -> data type (:func:`data_types`).
    """
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            configs, weights = m.embedding_bag_configs(), m.embedding_bags
        elif isinstance(m, EmbeddingCollection):
            configs, weights = m.embedding_configs(), m.embeddings
        else:
            continue
        for c in configs:
            if c.name in precisions:
                c.data_type = precisions[c.name]
                # torchrec's collections make every non-fp32 table fp16 (embedding_modules.py): the same here.
                weights[c.name].to(torch.float32 if c.data_type == DataType.FP32 else torch.float16)
