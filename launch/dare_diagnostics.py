"""DARE's diagnostics (Feng et al. 2025, section 3): gradient domination and conflict on the embeddings, and the
learned attention against the data's true relevance.

``python -m launch.dare_diagnostics --config CONFIG --run-dir RUN [--checkpoint best|latest|init] [--batches N]
[key=value ...]`` on any ``dare`` entry (DARE, or its TWIN variants with one shared table: ``model.tables=1``):

* gradient domination: over N training batches, the CTR loss's gradient on every embedding row touched, once
  through the attention path only (the representation cut) and once through the representation path only
  (the attention cut); the mean row norm of each and their ratio. With one shared table both land on the same
  rows (TWIN); with DARE's tables each lands on its own table;
* gradient conflict: the cosine between the two gradients of every row that both reach (shared tables only),
  as a histogram, and the share of rows with a negative cosine;
* attention vs ground truth (data with ``model.relevance_feature``, e.g. synthetic ``hist_relevance``): over
  the validation split, the ESU's mean weight and the true relevance of the survivors by position (log2 of the
  distance from the most recent behaviour) and by whether the behaviour is of the target's category; and how
  peaked the ESU's softmax is (``sharpness``: mean entropy, effective number of survivors ``exp(entropy)`` and
  largest weight per row).

Writes ``RUN/diagnostics/diagnostics.json``, TensorBoard ``RUN/diagnostics/tb`` (scalars, the cosine histogram,
the attention picture as an image) and ``RUN/diagnostics/attention.png`` (rows: learned weight, true relevance;
columns: position buckets, then other / same category; each row scaled to its maximum), and prints the JSON.
Exit 0; 2 config error or a missing checkpoint (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from datasets.reader import eval_loader, train_loader
from launch import checkpoint
from launch.config import ConfigError, load_config
from models.base import weighted_bce_loss
from models.dare.model import DARE, DAREConfig
from modules.sequence import jagged_offsets

POSITION_BUCKETS = 12  # log2 distance from the most recent behaviour: 0, 1, 2-3, ..., >= 2^11


def _tables(model: DARE) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.items.named_parameters()}


def gradient_stats(model: DARE, batches: list) -> dict[str, Any]:
    tables = _tables(model)
    norms: dict[str, list[float]] = {"attention": [], "representation": []}
    cosines: list[np.ndarray] = []
    for b in batches:
        grads = {}
        for path, cut in (("attention", "representation"), ("representation", "attention")):
            out = model.run(b, cut=cut)
            loss = weighted_bce_loss(out.logits, b.labels, b.weights)
            grads[path] = dict(zip(tables, torch.autograd.grad(loss, list(tables.values()), allow_unused=True)))
        for name in tables:
            ga, gr = grads["attention"][name], grads["representation"][name]
            for path, g in (("attention", ga), ("representation", gr)):
                if g is not None:
                    n = g.norm(dim=1)
                    norms[path] += n[n > 0].tolist()
            if ga is not None and gr is not None:
                both = (ga.norm(dim=1) > 0) & (gr.norm(dim=1) > 0)
                if both.any():
                    cosines.append(torch.nn.functional.cosine_similarity(ga[both], gr[both], dim=1).numpy())
    cos = np.concatenate(cosines) if cosines else np.zeros(0)
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in norms.items()}
    return {
        "grad_norm_attention": mean["attention"], "grad_norm_representation": mean["representation"],
        "domination_representation_over_attention": (mean["representation"] / mean["attention"]
                                                     if mean["attention"] else float("nan")),
        "rows_attention": len(norms["attention"]), "rows_representation": len(norms["representation"]),
        "rows_both": int(cos.size), "cosine_mean": float(cos.mean()) if cos.size else float("nan"),
        "conflict_share": float((cos < 0).mean()) if cos.size else float("nan"), "_cosines": cos,
    }  # fmt: skip


def sharpness(weights: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ESU weights ``[B, K]`` (``ok`` marks the real survivors): the entropy ``-sum w log w`` (nats),
    the effective number of survivors ``exp(entropy)`` and the largest weight; rows without survivors are
    dropped. A uniform row over n survivors gives ``log n``, ``n`` and ``1 / n``; one weight of 1 gives 0, 1, 1."""
    w = torch.where(ok, weights, 0.0).double()  # [B, K]
    keep = ok.any(dim=1)  # [B]
    entropy = -(w * torch.log(torch.where(w > 0, w, 1.0))).sum(dim=1)[keep]  # [B'] (0 log 0 = 0)
    return entropy, torch.exp(entropy), w.max(dim=1).values[keep]


def attention_vs_truth(model: DARE, cfg: Any, caps: dict) -> dict[str, Any]:
    mc: DAREConfig = model.cfg
    w_pos, r_pos, n_pos = (np.zeros(POSITION_BUCKETS) for _ in range(3))
    w_cat, r_cat, n_cat = (np.zeros(2) for _ in range(3))
    sharp: list[list[torch.Tensor]] = [[], [], []]
    model.eval()
    with torch.no_grad():
        for b in eval_loader(cfg.data, 0, 1, sequence_caps=caps):
            v, query, keys, bias = model.attention_inputs(b)
            result = model._search(b, query, keys, bias, v.lengths)
            weights, _ = model.attend(v, query, keys, bias, result)  # [B, K]
            rel = b.float_sequences[mc.relevance_feature].values()  # [S]
            idx, ok = result.indices, result.valid & b.valid.unsqueeze(1)  # [B, K]
            flat = idx[ok]
            rows = torch.nonzero(ok)[:, 0]
            ends = jagged_offsets(v.lengths) + v.lengths - 1  # [B] flat index of the most recent
            dist = (ends[rows] - flat).clamp(min=0)
            bucket = torch.floor(torch.log2(dist.double() + 1)).long().clamp(max=POSITION_BUCKETS - 1).numpy()
            same = (b.sparse_features[mc.hard_search_feature].values()[flat]
                    == b.sparse_features[mc.hard_target_feature].values()[rows]).long().numpy()
            w, r = weights[ok].double().numpy(), rel[flat].double().numpy()
            np.add.at(w_pos, bucket, w), np.add.at(r_pos, bucket, r), np.add.at(n_pos, bucket, 1)
            np.add.at(w_cat, same, w), np.add.at(r_cat, same, r), np.add.at(n_cat, same, 1)
            for acc, x in zip(sharp, sharpness(weights, ok)):
                acc.append(x)
    div = lambda a, n: np.where(n > 0, a / np.maximum(n, 1), 0.0)  # noqa: E731
    entropy, effective, largest = (torch.cat(x) if x else torch.zeros(0, dtype=torch.double) for x in sharp)
    mean = lambda x: float(x.mean()) if x.numel() else 0.0  # noqa: E731
    return {"by_position": {"weight": div(w_pos, n_pos).tolist(), "relevance": div(r_pos, n_pos).tolist(),
                            "count": n_pos.astype(int).tolist()},
            "by_category": {"labels": ["other", "same"], "weight": div(w_cat, n_cat).tolist(),
                            "relevance": div(r_cat, n_cat).tolist(), "count": n_cat.astype(int).tolist()},
            # how peaked the ESU's softmax is over the survivors (mean over validation rows with survivors)
            "sharpness": {"entropy": mean(entropy), "effective_survivors": mean(effective),
                          "max_weight": mean(largest), "rows": int(entropy.numel())}}


def picture(att: dict[str, Any], cell: int = 24) -> np.ndarray:
    """``[2 * cell, C * cell, 3]`` uint8: learned weight (top) and true relevance (bottom), each row / its max."""
    rows = []
    for key in ("weight", "relevance"):
        values = np.array(att["by_position"][key] + att["by_category"][key], dtype=np.float64)
        rows.append(values / values.max() if values.max() > 0 else values)
    grid = np.array(rows)  # [2, C]
    rgb = np.stack([grid, 0.3 * grid, 1.0 - grid], axis=-1)  # blue (low) to red (high)
    return (np.kron(rgb, np.ones((cell, cell, 1))) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.dare_diagnostics", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--checkpoint", default="best", help="best, latest, a checkpoint folder, or init")
    parser.add_argument("--batches", type=int, default=8, help="training batches for the gradient statistics")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg, spec, _ = load_config(args.config, args.overrides)
        if not isinstance(cfg.model, DAREConfig):
            raise ConfigError(f"model {spec.name}: the diagnostics need a dare entry (DARE or model.tables=1 for TWIN)")
        found = None if args.checkpoint == "init" else checkpoint.find(args.run_dir, args.checkpoint)
        if found is None and args.checkpoint in ("best", "latest"):
            raise ConfigError(f"{args.run_dir}: no {args.checkpoint} checkpoint")
        if found is None and args.checkpoint != "init":
            raise ConfigError(f"{args.checkpoint}: not a checkpoint")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)
    model = spec.build(cfg.model, cfg.data.schema, torch.device("cpu"))
    train_module = spec.build_train_module(model, cfg.model)
    if found is not None:
        state = train_module.state_dict()
        checkpoint.load_model(found, {"model": state})
        train_module.load_state_dict(state)
    caps = dict(spec.sequence_caps(cfg.model, cfg.data.schema))
    stream = iter(train_loader(cfg.data, 0, 1, sequence_caps=caps))
    model.train()
    grads = gradient_stats(model, [next(stream) for _ in range(args.batches)])
    cos = grads.pop("_cosines")
    report: dict[str, Any] = {"checkpoint": str(found) if found else "init", **grads}
    out = args.run_dir / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tb"))
    for k, v in grads.items():
        writer.add_scalar(f"diagnostics/{k}", float(v), 0)
    if cos.size:
        writer.add_histogram("diagnostics/gradient_cosine", cos, 0)
    if cfg.model.relevance_feature is not None:
        att = attention_vs_truth(model, cfg, caps)
        report["attention_vs_truth"] = att
        img = picture(att)
        Image.fromarray(img).save(out / "attention.png")
        writer.add_image("diagnostics/attention_vs_truth", img, 0, dataformats="HWC")
    writer.close()
    (out / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
