"""DUET's set-level head (paper: linear attention scores m candidates in O(m + n) instead of O(m n)): time to score
ONE request's m candidates with linear vs softmax attention, m = 1,000 ... 5,000, n = 200 behaviours.

The head (Xiao et al. 2025, DUET, set-level modelling): ``F_c-s = Attn(F_can, F_seq, F_seq)`` (candidates over
the behaviour sequence), ``F_c-c = Attn(F_can, F_can, F_can)`` (candidates over each other), then
``MLP([F_c-s, F_c-c, F_u, F_cro]) -> one logit per candidate`` with the user features ``F_u`` repeated m times.
Both modes are the same head with the same parameters; only the mixing differs
(``modules.linear_attention.SetLinearAttention(attention="linear" | "softmax")``, softmax through
``scaled_dot_product_attention``). Only c2c is quadratic in m for softmax (c2s is m x n, n fixed), so softmax
grows with an exponent between 1 and 2; the MLP is linear in m in both modes and bounds the ratio.

Both modes are timed on the serving path, ``SetHead.score`` (as ``models.duet.PreRanker.score``): each attention's
``W_o`` and MLP block folded into its per-request state (``SetLinearAttention.fold_keys``), ``F_u``'s block once
per request, and the candidates in steps of ``SCORE_TILE`` rows through ``modules.folded_head.score_folded``
(one product for both attentions' queries, one for both states, then the rest of the MLP). The table also shows
the plain ``forward`` (concatenation, then the MLP) of each mode.

Embeddings are random (the time does not depend on their values); ``torch.no_grad``, eval mode,
``--threads`` threads, ``--warmup`` calls, then the median of ``--repeats`` calls, the modes interleaved so
that a loaded machine slows both alike. A second table splits the time at ``--breakdown-m`` into the head's parts.

Two more tables time the zoo's own scorer, ``models.duet.PreRanker`` built from ``configs/models/duet.yaml``
(``--zoo-config``; ``model.attention`` linear vs softmax, the same parameters), on a one-request Batch with m
candidates and n behaviours, through ``PreRanker.score``: embedding lookups, padding, both attentions and the MLP
included; once at the config's widths and once at the paper's (item features 2 x 32 = 64 wide, ``model_dim`` 64,
as the set head above).

    .venv/bin/python benchmarks/duet_latency.py [--m 1000 1500 ... 5000] [--n 200] [--model-dim 64]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modules.folded_head import score_folded  # noqa: E402
from modules.linear_attention import AttentionKind, SetLinearAttention  # noqa: E402
from modules.mlp import MLP  # noqa: E402


class SetHead(nn.Module):
    """A DUET-like set head over one padded batch of requests (every feature ``dim`` wide).

    Args:
        dim: width of the candidate, behaviour, user and cross features.
        model_dim: width of the attention projections and outputs.
        heads: attention heads.
        hidden: hidden widths of the prediction MLP.
        attention: ``linear`` or ``softmax``.
    """

    def __init__(self, dim: int, model_dim: int, heads: int, hidden: Sequence[int], attention: AttentionKind) -> None:
        super().__init__()
        self.c2s = SetLinearAttention(dim, dim, dim, model_dim, heads=heads, attention=attention)
        self.c2c = SetLinearAttention(dim, dim, dim, model_dim, heads=heads, attention=attention)
        self.mlp = MLP(2 * model_dim + 2 * dim, hidden, out_features=1)

    def features(
        self,
        can: torch.Tensor,
        seq: torch.Tensor,
        user: torch.Tensor,
        cross: torch.Tensor,
        can_mask: torch.Tensor,
        seq_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``[F_c-s, F_c-c, F_u, F_cro]``: ``[B, M, 2 model_dim + 2 D]`` (arguments as in :meth:`forward`)."""
        f_cs = self.c2s(can, seq, seq, can_mask, seq_mask)  # [B, M, model_dim]
        f_cc = self.c2c(can, can, can, can_mask, can_mask)  # [B, M, model_dim]
        f_u = user.unsqueeze(1).expand(-1, can.size(1), -1)  # [B, M, D]: F_u repeated m times
        return torch.cat([f_cs, f_cc, f_u, cross], dim=-1)  # [B, M, 2 model_dim + 2 D]

    def forward(
        self,
        can: torch.Tensor,
        seq: torch.Tensor,
        user: torch.Tensor,
        cross: torch.Tensor,
        can_mask: torch.Tensor,
        seq_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Scores every candidate.

        Args:
            can: ``[B, M, D]`` candidates ``F_can``.
            seq: ``[B, N, D]`` behaviours ``F_seq``.
            user: ``[B, D]`` user features ``F_u``.
            cross: ``[B, M, D]`` user-candidate cross features ``F_cro``.
            can_mask: ``[B, M]`` bool, True on real candidates.
            seq_mask: ``[B, N]`` bool, True on real behaviours.

        Returns:
            ``[B, M]`` logits.
        """
        return self.mlp(self.features(can, seq, user, cross, can_mask, seq_mask)).squeeze(-1)  # [B, M]

    def score(self, can, seq, user, cross, can_mask, seq_mask) -> torch.Tensor:
        """The serving path, as ``models.duet.PreRanker.score``: :meth:`forward`'s logits ``[B, M]`` (up to float
        rounding). Each attention's ``W_o`` and MLP block are folded into its per-request state
        (``SetLinearAttention.fold_keys``), ``F_u``'s block is computed once per request, and the candidates run
        through ``modules.folded_head.score_folded`` in steps of ``SCORE_TILE`` rows: no concatenation, no
        attention output or ``W_o`` product per candidate."""
        a, d = self.c2s.model_dim, can.size(-1)
        w_cs, w_cc, w_u, w_c = self.mlp.first_blocks([a, a, d, d])  # [F, width] each
        parts = [(self.c2s, self.c2s.fold_keys(w_cs, seq, seq, seq_mask)),
                 (self.c2c, self.c2c.fold_keys(w_cc, can, can, can_mask))]  # fmt: skip
        bias = torch.nn.functional.linear(user, w_u, self.mlp.layers[0].bias) + parts[0][1].per_request
        bias = bias + parts[1][1].per_request  # [B, F]
        return score_folded(parts, can, can_mask, [(cross, w_c)], bias, self.mlp)  # [B, M]


def _inputs(m: int, n: int, dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(m)
    return (
        torch.randn(1, m, dim, generator=g),
        torch.randn(1, n, dim, generator=g),
        torch.randn(1, dim, generator=g),
        torch.randn(1, m, dim, generator=g),
        torch.ones(1, m, dtype=torch.bool),
        torch.ones(1, n, dtype=torch.bool),
    )


def _timings(fns: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of every call of each function, the functions called in turn within every repeat."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return times


def _medians(fns: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Median seconds of each function (:func:`_timings`)."""
    return [statistics.median(ts) for ts in _timings(fns, warmup, repeats)]


def _ratio(slow: Sequence[float], fast: Sequence[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of the per-repeat ratios ``slow / fast``: the calls of one repeat run
    back to back, so a slowdown of the machine (this VM's speed drifts by 30% within a minute) cancels."""
    q1, q2, q3 = statistics.quantiles([s / f for s, f in zip(slow, fast)], n=4)
    return q2, q1, q3


def _slope(ms: Sequence[int], ts: Sequence[float]) -> float:
    """Least-squares slope of log t over log m (1: linear growth, 2: quadratic)."""
    xs, ys = [math.log(m) for m in ms], [math.log(t) for t in ts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _zoo_scorers(config: Path, overrides: dict) -> tuple[nn.Module, nn.Module, object]:
    """The zoo's duet scorer from ``config`` (a model YAML) with ``overrides`` (config fields) in both attention
    modes, and its request schema."""
    import dataclasses

    from omegaconf import OmegaConf

    from datasets.config import DataConfig
    from launch.config import _read_yaml
    from models.duet import PreRanker, PreRankerConfig, Training

    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                               _read_yaml(ROOT / "configs/datasets/synthetic_requests_tiny.yaml").data))
    schema = data.schema
    for f in schema.id_features:  # production-like table sizes (the lookups then leave the caches)
        f.num_embeddings = {"item_id": 1_000_000, "item_category": 1_000}.get(f.table or f.name, f.num_embeddings)
    section = _read_yaml(config).model  # includes resolved
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PreRankerConfig), section))
    cfg = dataclasses.replace(cfg, training=Training.exposed, user_features=["user_id", "user_segment"], **overrides)
    torch.manual_seed(0)
    linear = PreRanker(dataclasses.replace(cfg, attention="linear"), schema, None, None).eval()
    softmax = PreRanker(dataclasses.replace(cfg, attention="softmax"), schema, None, None).eval()
    softmax.load_state_dict(linear.state_dict())
    return linear, softmax, schema


def _zoo_batch(schema, m: int, n: int):
    """One request: n behaviours, m candidates, random ids in range."""
    import numpy as np
    import pyarrow as pa

    from datasets.config import DataConfig
    from datasets.decode import Where, decode

    rng = np.random.default_rng(m)
    sizes = {f.name: f.num_embeddings for f in schema.id_features}
    cols = {"request_id": [1], "user_id": [1], "user_segment": [1]}
    for name in ("hist_item_id", "hist_category"):
        cols[name] = [rng.integers(1, sizes[name], n).tolist()]
    for name in ("cand_item_id", "cand_category", "cand_cross"):
        cols[name] = [rng.integers(1, sizes[name], m).tolist()]
    for name in ("cand_propensity", "cand_stage", "cand_click", "cand_exposed", "cand_true_click"):
        cols[name] = [np.zeros(m, dtype=np.float32).tolist()]
    types = schema.arrow_types()
    table = pa.table({k: pa.array(v, type=types[k][0]) for k, v in cols.items()})
    return decode(table, schema, DataConfig(schema=schema), {}, Where("duet_latency", 0, 0, 0)).to_batch(schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(range(1000, 5001, 500)), help="candidates")
    ap.add_argument("--n", type=int, default=200, help="behaviour sequence length")
    ap.add_argument("--model-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--mlp-hidden", type=int, nargs="*", default=[128, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--breakdown-m", type=int, default=4500)
    ap.add_argument("--zoo-config", type=Path, default=ROOT / "configs/models/duet.yaml")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dim = args.model_dim
    torch.manual_seed(0)
    linear = SetHead(dim, args.model_dim, args.heads, args.mlp_hidden, AttentionKind.linear).eval()
    softmax = SetHead(dim, args.model_dim, args.heads, args.mlp_hidden, AttentionKind.softmax).eval()
    softmax.load_state_dict(linear.state_dict())  # the same head, the same parameters

    print(f"DUET set head, one request: n = {args.n}, model_dim = {args.model_dim}, heads = {args.heads}, "
          f"MLP {args.mlp_hidden}, {args.threads} thread(s), median of {args.repeats} after {args.warmup} warmup")
    print("| m | linear ms | softmax ms | softmax / linear (quartiles) | linear µs / cand | softmax µs / cand "
          "| linear, forward ms | softmax, forward ms |")
    print("|---|---|---|---|---|---|---|---|")
    lin_ts, soft_ts = [], []
    with torch.no_grad():
        for m in args.m:
            x = _inputs(m, args.n, dim)
            calls = _timings(
                [lambda: linear.score(*x), lambda: softmax.score(*x), lambda: linear(*x), lambda: softmax(*x)],
                args.warmup, args.repeats)
            t_lin, t_soft, f_lin, f_soft = (statistics.median(ts) for ts in calls)
            ratio, q1, q3 = _ratio(calls[1], calls[0])
            lin_ts.append(t_lin)
            soft_ts.append(t_soft)
            print(f"| {m:,} | {t_lin * 1e3:.2f} | {t_soft * 1e3:.2f} | {ratio:.1f}x ({q1:.1f}-{q3:.1f}) | "
                  f"{t_lin * 1e6 / m:.2f} | {t_soft * 1e6 / m:.2f} | {f_lin * 1e3:.2f} | {f_soft * 1e3:.2f} |")
        if len(args.m) > 1:
            print(f"growth exponent (log-log slope of ms over m): linear {_slope(args.m, lin_ts):.2f}, "
                  f"softmax {_slope(args.m, soft_ts):.2f}")

        m = args.breakdown_m
        can, seq, user, cross, can_mask, seq_mask = _inputs(m, args.n, dim)
        w_cs, w_cc, w_u, w_c = linear.mlp.first_blocks([args.model_dim, args.model_dim, dim, dim])
        folded = {
            a: [(a.c2s, a.c2s.fold_keys(w_cs, seq, seq, seq_mask)), (a.c2c, a.c2c.fold_keys(w_cc, can, can, can_mask))]
            for a in (linear, softmax)
        }
        bias = torch.nn.functional.linear(user, w_u, linear.mlp.layers[0].bias)
        parts = {
            "c2s keys (m-independent), fold_keys": lambda a: a.c2s.fold_keys(w_cs, seq, seq, seq_mask),
            "c2c keys, fold_keys": lambda a: a.c2c.fold_keys(w_cc, can, can, can_mask),
            "queries, both states, F_cro block, rest of the MLP (score_folded)": lambda a: score_folded(
                folded[a], can, can_mask, [(cross, w_c)], bias, a.mlp),
        }
        print(f"\nwhere the time goes at m = {m:,} (the serving path; ms, median of {args.repeats}):")
        print("| part | linear ms | softmax ms | softmax / linear |")
        print("|---|---|---|---|")
        for name, part in parts.items():
            t_lin, t_soft = _medians([lambda: part(linear), lambda: part(softmax)], args.warmup, args.repeats)
            print(f"| {name} | {t_lin * 1e3:.2f} | {t_soft * 1e3:.2f} | {t_soft / t_lin:.1f}x |")

        widths = {"the config's widths": {}, "the paper's widths": {"embedding_dim": 32, "model_dim": 64}}
        for label, over in widths.items():
            zoo_lin, zoo_soft, schema = _zoo_scorers(args.zoo_config, over)
            c = zoo_lin.cfg
            print(f"\nthe zoo's duet scorer ({args.zoo_config.relative_to(ROOT)} at {label}: embedding "
                  f"{c.embedding_dim} x {len(c.candidate_features)} item features, model_dim {c.model_dim}, "
                  f"heads {c.heads}, MLP {c.mlp_hidden}), one request Batch, n = {args.n}:")
            print("| m | linear ms | softmax ms | softmax / linear | linear µs / cand |")
            print("|---|---|---|---|---|")
            zl, zs = [], []
            for m in args.m:
                b = _zoo_batch(schema, m, args.n)
                calls = [lambda: zoo_lin.score(b), lambda: zoo_soft.score(b)]
                t_lin, t_soft = _medians(calls, args.warmup, args.repeats)
                zl.append(t_lin)
                zs.append(t_soft)
                print(f"| {m:,} | {t_lin * 1e3:.2f} | {t_soft * 1e3:.2f} | {t_soft / t_lin:.1f}x | "
                      f"{t_lin * 1e6 / m:.2f} |")
            if len(args.m) > 1:
                print(f"growth exponent: linear {_slope(args.m, zl):.2f}, softmax {_slope(args.m, zs):.2f}")


if __name__ == "__main__":
    main()
