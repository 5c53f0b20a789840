"""TWIN's projection cache (Chang et al. 2023, section 3.4): precompute ``K_h W_h`` of every item from a checkpoint.

``python -m launch.twin_cache --config CONFIG --run-dir RUN [--checkpoint best|latest|PATH] [--eval] [key=value ...]``

1. builds the entry of ``CONFIG`` (``search: soft``) with ``model.gsu_cache=true``, unsharded on CPU, and loads
   the checkpoint's model state (DCP reshards it: a checkpoint of any world size loads);
2. reads which category (and other inherent features) each item has from the data files of every split (the
   target columns and every behaviour: the catalogue the run knows); items seen with several values are
   counted and take the most frequent one; items never seen get a zero row (counted);
3. fills the cache table ``t_<item table>__gsu_cache`` (one row per item, ``H * d_k`` wide: the GSU's keys)
   and writes ``RUN/gsu_cache/``: a DCP checkpoint ``{"model": ...}`` of the serving model (every table, the
   cache included: an ordinary embedding table that a run with ``model.gsu_cache=true`` plans and shards like
   any other) and ``cache.json`` (source checkpoint, rows, conflicts, unseen items);
4. with ``--eval``: evaluates the validation split twice in this process, GSU by live projection and GSU by
   cache lookup, and prints both AUCs, the share of rows whose top-K is identical, the largest score difference
   and the GSU time of each path.

Exit 0; 2 config error or a checkpoint that does not exist (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch
import torch.distributed.checkpoint as dcp

from datasets.files import expand_paths
from datasets.reader import eval_loader
from datasets.schema import table_name
from launch import checkpoint
from launch.config import ConfigError, load_config
from launch.metrics import auc
from models.twin.model import Search, TWINConfig, TwoStage

CACHE_DIR = "gsu_cache"


def item_attributes(paths: list[str], target: list[str], history: list[str], num_items: int) -> tuple[np.ndarray, dict]:
    """``[num_items, F - 1]`` the other inherent ids of every item (most frequent value), and counts.

    Args:
        paths: parquet files.
        target: the target's inherent columns, item id first (``item_id``, ``item_category``, ...).
        history: the aligned behaviour columns (``hist_item_id``, ``hist_category``, ...).
        num_items: rows of the item table.
    """
    others = len(target) - 1
    pairs: list[np.ndarray] = []
    for batch in pads.dataset(paths, format="parquet").to_batches(columns=target + history):
        cols = [np.asarray(batch.column(c)) for c in target]
        pairs.append(np.stack(cols, axis=1))
        flat = [batch.column(c).flatten().to_numpy(zero_copy_only=False) for c in history]
        pairs.append(np.stack(flat, axis=1))
    allpairs = np.concatenate(pairs) if pairs else np.zeros((0, len(target)), dtype=np.int64)
    uniq, n = np.unique(allpairs, axis=0, return_counts=True)
    # Most frequent combination per item: sort by (item, -count) and keep the first of each item.
    order = np.lexsort((-n, uniq[:, 0]))
    uniq, n = uniq[order], n[order]
    first = np.ones(len(uniq), dtype=bool)
    first[1:] = uniq[1:, 0] != uniq[:-1, 0]
    _, per_item = np.unique(uniq[:, 0], return_counts=True)
    attrs = np.zeros((num_items, others), dtype=np.int64)
    seen = np.zeros(num_items, dtype=bool)
    keep = uniq[first]
    attrs[keep[:, 0]] = keep[:, 1:]
    seen[keep[:, 0]] = True
    return attrs, {"items_seen": int(seen[1:].sum()), "items_unseen": int((~seen[1:]).sum()),
                   "items_with_several_values": int((per_item > 1).sum()), "seen": seen}


def fill_cache(model: TwoStage, attrs: np.ndarray, seen: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    """Writes ``K_h W_h`` of every item into the model's cache table; returns the table ``[num_items, H d_k]``."""
    cfg = model.cfg
    if not hasattr(model.ec, "embeddings"):  # a ManagedCollisionLookup: raw ids, rows assigned while training
        raise ValueError(
            "twin_cache: the item tables use mapping: mch (raw ids, rows assigned by the ZCH), but the cache is"
            " indexed by item row; build the cache for an identity- or hash-mapped item table"
        )
    tables = model.ec.embeddings
    feature_table = {f: c.name for c in model.ec.embedding_configs() for f in c.feature_names}
    weights = [tables[feature_table[f]].weight for f in cfg.history_features]
    cache_cfg = model.cache_ec.embedding_configs()[0]
    cache = model.cache_ec.embeddings[cache_cfg.name].weight
    n = cache.size(0)
    with torch.no_grad():
        for start in range(0, n, chunk):
            ids = torch.arange(start, min(n, start + chunk))
            cols = [ids] + [torch.from_numpy(attrs[start:start + len(ids), j]) for j in range(attrs.shape[1])]
            inherent = torch.cat([w[c] for w, c in zip(weights, cols)], dim=-1)  # [n, I]
            keys = model.relevance.keys(inherent).reshape(len(ids), -1)  # [n, H d_k]
            keys[~torch.from_numpy(seen[start:start + len(ids)])] = 0.0
            cache[start:start + len(ids)] = keys
    return cache


def _evaluate(train_module: torch.nn.Module, cfg: Any, caps: dict, use_cache: bool) -> dict:
    model: TwoStage = train_module.model
    saved = model.cache_ec
    if not use_cache:
        model.cache_ec = None
    scores, labels, topk, gsu_scores, gsu_time = [], [], [], [], 0.0
    model.eval()
    with torch.no_grad():
        for b in eval_loader(cfg.data, 0, 1, sequence_caps=caps):
            t = time.perf_counter()
            out = model.run(b)
            gsu_time += time.perf_counter() - t
            keep = b.valid
            scores.append(out.logits[keep, 0])
            labels.append(b.labels[keep, 0])
            topk.append(out.search.indices[keep])
            gsu_scores.append(out.search.scores)
    model.cache_ec = saved
    return {"auc": auc(torch.cat(scores), torch.cat(labels)), "topk": torch.cat(topk), "logits": torch.cat(scores),
            "gsu_scores": torch.cat(gsu_scores), "seconds": gsu_time}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.twin_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--checkpoint", default="best", help="best, latest or a checkpoint folder")
    parser.add_argument("--eval", action="store_true", help="compare cached and live GSU on the validation split")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg, spec, _ = load_config(args.config, args.overrides)
        if not isinstance(cfg.model, TWINConfig) or cfg.model.search != Search.soft:
            raise ConfigError(f"model {spec.name}: the projection cache needs a two-stage entry with search: soft")
        found = checkpoint.find(args.run_dir, args.checkpoint)
        if found is None:
            raise ConfigError(f"{args.run_dir}: no {args.checkpoint} checkpoint to build the cache from")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    model_cfg = replace(cfg.model, gsu_cache=True)
    schema = cfg.data.schema
    model = spec.build(model_cfg, schema, torch.device("cpu"))
    train_module = spec.build_train_module(model, model_cfg)
    cache_table = table_name(schema.id_feature(model_cfg.history_features[0]).table or model_cfg.history_features[0], "gsu_cache")
    state = {k: v for k, v in train_module.state_dict().items() if cache_table not in k}
    checkpoint.load_model(found, {"model": state})
    train_module.load_state_dict(state, strict=False)
    num_items = schema.id_feature(model_cfg.history_features[0]).num_embeddings
    splits = list(cfg.data.train_paths) + list(cfg.data.eval_paths) + list(cfg.data.test_paths or [])
    attrs, info = item_attributes(expand_paths(splits), model_cfg.target_features,
                                  model_cfg.history_features, num_items)
    seen = info.pop("seen")
    fill_cache(model, attrs, seen)
    out = args.run_dir / CACHE_DIR
    out.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": train_module.state_dict()}, checkpoint_id=str(out))
    meta = {"source": str(found), "step": checkpoint.read_meta(found).step, "table": cache_table, "rows": num_items,
            "width": model_cfg.num_heads * model_cfg.head_dim, **info}
    (out / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))
    if args.eval:
        caps = dict(spec.sequence_caps(model_cfg, schema))
        live = _evaluate(train_module, cfg, caps, use_cache=False)
        cached = _evaluate(train_module, cfg, caps, use_cache=True)
        same = (live["topk"] == cached["topk"]).all(dim=1).float().mean().item()
        report = {"auc_live": live["auc"], "auc_cached": cached["auc"], "rows_with_identical_topk": same,
                  "max_logit_diff": float((live["logits"] - cached["logits"]).abs().max()),
                  "max_gsu_score_diff": float((live["gsu_scores"] - cached["gsu_scores"]).abs().max()),
                  "forward_s_live": live["seconds"], "forward_s_cached": cached["seconds"]}
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
