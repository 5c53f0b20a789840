"""Two-stage lifelong-sequence CTR models: TWIN (Chang et al. 2023, KDD) and SIM (Pi et al. 2020, CIKM).

One model, the search as config (TWIN section 3.2, Fig. 2): a long-term module searches the whole history
(10^4-10^5 behaviours, jagged) and attends over the K survivors; a short-term module (DIN over the last 50
behaviours) and the other features sit beside it; an MLP mixes them.

* ``search: soft``: TWIN's CP-GSU (the ESU's own relevance ranks every behaviour, ``modules.search``);
* ``search: hard``: behaviours of the target's category, most recent first (SIM-hard's GSU; TWIN-hard);
* ``search: inner_product``: SIM-soft's GSU, the inner product of separately trained embeddings (tables of
  role ``gsu``, trained only by an auxiliary loss: attention-pooled history vs target over the whole history);
* ``search: oracle``: a diagnostic, not a model: the K behaviours of highest true relevance
  (``relevance_feature``, synthetic data's ``hist_relevance``), an upper bound of what any GSU can hand the ESU;
* ``esu: twin``: TWIN's ESU (relevance with inherent/cross split, H heads, W_o);
* ``esu: mha``: multi-head target attention over the survivors' full features (SIM's ESU).

Behaviour features: item-inherent ``history_features`` (aligned with ``target_features``, sharing their
tables), user-item cross ``cross_id_features`` (their own tables, width ``cross_dim``) and the time since the
behaviour (``time_feature``, seconds, bucketed by log2 into ``time_buckets`` rows of width ``cross_dim``).

Shapes: B batch, S behaviours in the batch, K survivors, L_s short-term length, D embedding dim, I = D *
(number of item features) the inherent width, I_c the cross width, T tasks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import IdMapping, SchemaConfig
from models.common import check_search_features, require_sample_labels
from modules.embedding import build_embedding_collection, concat_jagged, lookup_jagged
from modules.mlp import MLP, Activation
from modules.search import (
    ExactSearchUnit,
    GeneralSearchUnit,
    SearchResult,
    TwinRelevance,
    gather_survivors,
    hard_search,
    log2_time_buckets,
    row_ids,
    unique_items,
)
from modules.sequence import jagged_topk, last_n
from modules.target_attention import MultiHeadTargetAttention, TargetAttention


class Search(str, enum.Enum):
    soft = "soft"
    hard = "hard"
    inner_product = "inner_product"
    oracle = "oracle"  # a diagnostic, not a model: the true top K by ``relevance_feature`` (the ground truth)


class GSUKeys(str, enum.Enum):
    folded = "folded"
    distinct = "distinct"
    naive = "naive"


class ESU(str, enum.Enum):
    twin = "twin"
    mha = "mha"


@dataclass
class TWINConfig:
    """The ``model:`` section of a TWIN / SIM run.

    Attributes:
        name: registry key (``twin``; ``sim_hard`` / ``sim_soft`` change the defaults of ``search`` / ``esu``).
        embedding_dim: D, width of the item-feature and user tables.
        user_feature: scalar user id feature (None: none).
        target_features: scalar features of the target item (item id first), concatenated.
        history_features: item-inherent behaviour features K_h, aligned with ``target_features``.
        cross_id_features: user-item cross behaviour id features of K_c (e.g. ``hist_behavior_type``).
        time_feature: float behaviour feature, seconds from the behaviour to the request (None: none).
        time_buckets: rows of the log2 time-bucket embedding.
        cross_dim: width of each cross feature's embedding.
        search: the GSU (see the module docstring).
        esu: the ESU.
        top_k: K, survivors per row (TWIN: 100).
        num_heads: H of the ESU (TWIN: 4).
        head_dim: d_k per head.
        long_history: the most recent behaviours the long-term module searches (0: all the reader gives).
        hard_search_feature: behaviour feature matched against ``hard_target_feature`` (``search: hard``).
        hard_target_feature: the target's feature for the hard search.
        gsu_dim: width of SIM-soft's ``gsu`` tables.
        gsu_aux_weight: weight of SIM-soft's auxiliary loss.
        gsu_keys: how the CP-GSU scores behaviours without a cache (the same ranking, up to float rounding):
            ``folded`` (W_h folded into the query: a dot product with the inherent features, no projection),
            ``distinct`` (each distinct item of the batch projected once) or ``naive`` (every behaviour).
        gsu_cache: add the projection cache table (``t_<item table>__gsu_cache``, H * d_k wide) and, in eval
            mode, rank by it instead of projecting (fill it with ``python -m models.twin.cache``).
        short_history: L_s of the short-term DIN module (0: no short-term module).
        short_attention_hidden: hidden widths of its activation unit.
        target_cross: also feed ``target * long`` and ``target * short`` to the MLP.
        mlp_batch_norm: batch-normalise the MLP input.
        mlp_hidden: hidden widths of the prediction MLP.
        activation: activation of the MLPs.
        dropout: dropout after each hidden layer of the prediction MLP.
        relevance_feature: float behaviour feature holding the true relevance (synthetic data's
            ``hist_relevance``); evaluation then reports the GSU's NDCG@K / recall@K against it. Never an input.
    """

    name: str = "twin"
    embedding_dim: int = 16
    user_feature: Optional[str] = "user_id"
    target_features: list[str] = field(default_factory=lambda: ["item_id", "item_category"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    cross_id_features: list[str] = field(default_factory=list)
    time_feature: Optional[str] = "hist_time_delta"
    time_buckets: int = 32
    cross_dim: int = 4
    search: Search = Search.soft
    esu: ESU = ESU.twin
    top_k: int = 100
    num_heads: int = 4
    head_dim: int = 16
    long_history: int = 0
    hard_search_feature: str = "hist_category"
    hard_target_feature: str = "item_category"
    gsu_dim: int = 16
    gsu_aux_weight: float = 1.0
    gsu_keys: GSUKeys = GSUKeys.folded
    gsu_cache: bool = False
    short_history: int = 50
    short_attention_hidden: list[int] = field(default_factory=lambda: [36])
    target_cross: bool = True
    mlp_batch_norm: bool = True
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = Activation.prelu
    dropout: float = 0.0
    relevance_feature: Optional[str] = None


@dataclass
class TwoStageOutput:
    """What :meth:`TwoStage.run` computes: logits ``[B, T]``, SIM-soft's auxiliary logits ``[B]`` (or None),
    the GSU's choice and the history lengths ``[B]``."""

    logits: torch.Tensor
    aux_logits: Optional[torch.Tensor]
    search: SearchResult
    lengths: torch.Tensor


def _check(cfg: TWINConfig, schema: SchemaConfig) -> None:
    hard = (cfg.hard_search_feature, cfg.hard_target_feature) if cfg.search == Search.hard else None
    check_search_features(schema, cfg.target_features, cfg.history_features, [cfg.time_feature, cfg.relevance_feature], hard)
    if cfg.search == Search.oracle and not cfg.relevance_feature:
        raise ValueError("search: oracle ranks by the true relevance: set model.relevance_feature "
                         "(e.g. hist_relevance)")
    for name in ([cfg.user_feature] if cfg.user_feature else []) + cfg.target_features:
        if schema.id_feature(name).sequence:
            raise ValueError(f"{name} must be a scalar id feature")
    seq = cfg.history_features + cfg.cross_id_features
    groups = {schema.id_feature(n).group for n in seq if schema.id_feature(n).sequence}
    if len(groups) != 1 or not all(schema.id_feature(n).sequence for n in seq):
        raise ValueError(f"behaviour features {seq} must be sequence features of one group")
    if cfg.top_k <= 0 or cfg.long_history < 0 or cfg.short_history < 0:
        raise ValueError("top_k must be > 0, long_history and short_history >= 0")
    if cfg.gsu_cache and cfg.search != Search.soft:
        raise ValueError("gsu_cache caches the CP-GSU's projection: it needs search: soft")


class TwoStage(nn.Module):
    """TWIN / SIM: GSU + ESU over the whole history, DIN over the recent part, an MLP over everything.

    ``logits = MLP([e_user, v_t, long, short (, v_t * long, v_t * short)])``, ``long = ESU(top-K of GSU)``.

    Args:
        cfg: the model config.
        schema: the data schema.
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: TWINConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check(cfg, schema)
        self.cfg = cfg
        d = cfg.embedding_dim
        self.scalars = ([cfg.user_feature] if cfg.user_feature else []) + list(cfg.target_features)
        self.ec = build_embedding_collection(schema, self.scalars + cfg.history_features, d, device)
        self.cross_ec = (
            build_embedding_collection(schema, cfg.cross_id_features, cfg.cross_dim, device)
            if cfg.cross_id_features else None
        )
        self.time = nn.Embedding(cfg.time_buckets, cfg.cross_dim, device=device) if cfg.time_feature else None
        item = d * len(cfg.target_features)
        self.item_dim = item
        # Ids below their table's rows fold into one key; raw ids (mapping: mch) do not: a row-wise unique then.
        raw = any(schema.id_feature(f).mapping is IdMapping.mch for f in cfg.history_features)
        self.item_id_ranges = None if raw else [schema.id_feature(f).num_embeddings for f in cfg.history_features]
        cross_dims = [cfg.cross_dim] * (len(cfg.cross_id_features) + (1 if cfg.time_feature else 0))
        value_dim = item + sum(cross_dims)
        if cfg.esu == ESU.twin or cfg.search == Search.soft:
            self.relevance: Optional[TwinRelevance] = TwinRelevance(
                item, item, cross_dims, cfg.num_heads, cfg.head_dim, device=device
            )
        else:
            self.relevance = None
        if cfg.esu == ESU.twin:
            self.esu: nn.Module = ExactSearchUnit(self.relevance, value_dim, item, device=device)
        else:
            self.esu = MultiHeadTargetAttention(
                item, value_dim, cfg.num_heads, cfg.head_dim, output_dim=item, device=device
            )
        self.gsu = GeneralSearchUnit(self.relevance, cfg.top_k) if cfg.search == Search.soft else None
        self.gsu_ec = (
            build_embedding_collection(
                schema, list(cfg.target_features) + cfg.history_features, cfg.gsu_dim, device, role="gsu"
            )
            if cfg.search == Search.inner_product else None
        )
        self.aux_bias = nn.Parameter(torch.zeros(1, device=device)) if self.gsu_ec is not None else None
        self.cache_ec = (
            build_embedding_collection(
                schema, cfg.history_features[:1], cfg.num_heads * cfg.head_dim, device, role="gsu_cache"
            )
            if cfg.gsu_cache else None
        )
        self.short = (
            TargetAttention(item, cfg.short_attention_hidden, activation=cfg.activation, softmax=True,
                            factorized=True, device=device)
            if cfg.short_history > 0 else None
        )
        parts = 2 + (1 if cfg.short_history else 0)
        crosses = (1 + (1 if cfg.short_history else 0)) if cfg.target_cross else 0
        width = (d if cfg.user_feature else 0) + (parts + crosses) * item
        self.norm: nn.Module = nn.BatchNorm1d(width, device=device) if cfg.mlp_batch_norm else nn.Identity()
        self.mlp = MLP(width, cfg.mlp_hidden, out_features=require_sample_labels(schema, cfg.name),
                       activation=cfg.activation, dropout=cfg.dropout, device=device)

    def reset_parameters(self) -> None:
        """Only this module's own parameter (SIM-soft's auxiliary bias: 0); submodules reset themselves."""
        if self.aux_bias is not None and not self.aux_bias.is_meta:
            nn.init.zeros_(self.aux_bias)

    def _cross(self, batch: Batch) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """The cross features of every behaviour: the id features' embeddings (``[S, cross_dim]`` each, with
        gradients) and the time buckets (``[S]`` long; None without ``time_feature``)."""
        ids: list[torch.Tensor] = []
        if self.cross_ec is not None:
            e = lookup_jagged(self.cross_ec, batch.sparse_features, self.cfg.cross_id_features)
            ids = [e[f].values() for f in self.cfg.cross_id_features]
        bucket = None
        if self.time is not None:
            seconds = batch.float_sequences[self.cfg.time_feature].values()  # [S]
            bucket = log2_time_buckets(seconds, self.cfg.time_buckets)  # [S]
        return ids, bucket

    def _cross_values(self, ids: list[torch.Tensor], bucket: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[..., I_c]``: cross id embeddings ++ time-bucket embedding (None without cross features)."""
        parts = list(ids) + ([self.time(bucket)] if bucket is not None else [])
        return torch.cat(parts, dim=-1) if parts else None

    def _search(self, batch: Batch, target: torch.Tensor, inherent: torch.Tensor, lengths: torch.Tensor,
                cross: Optional[torch.Tensor]) -> tuple[SearchResult, Optional[torch.Tensor]]:
        """The GSU's survivors, and SIM-soft's auxiliary logits ``[B]`` (None otherwise)."""
        cfg, kjt = self.cfg, batch.sparse_features
        if cfg.search == Search.soft:
            query = self.relevance.query(target)  # [B, H, d_k]
            if self.cache_ec is not None and not self.training:
                cached = lookup_jagged(self.cache_ec, kjt, cfg.history_features[:1])[cfg.history_features[0]]
                return self.gsu(query, lengths, cross=cross, cached_keys=cached.values()), None
            items = None
            if cfg.gsu_keys == GSUKeys.distinct:
                ids = torch.stack([kjt[f].values() for f in cfg.history_features], dim=1)  # [S, F]
                items = unique_items(ids, self.item_id_ranges)
            return self.gsu(query, lengths, cross=cross, inherent=inherent, items=items,
                            fold=cfg.gsu_keys == GSUKeys.folded), None
        if cfg.search == Search.oracle:  # the ground truth, for the diagnostic only
            truth = batch.float_sequences[cfg.relevance_feature].values()  # [S]
            indices, valid = jagged_topk(truth, lengths, cfg.top_k)
            return SearchResult(indices=indices, valid=valid, scores=truth), None
        if cfg.search == Search.hard:
            return hard_search(kjt[cfg.hard_search_feature].values(), kjt[cfg.hard_target_feature].values(),
                               lengths, cfg.top_k), None
        e = lookup_jagged(self.gsu_ec, kjt, list(cfg.target_features) + cfg.history_features)
        t = torch.cat([e[f].values() for f in cfg.target_features], dim=-1)  # [B, I_g]
        h = concat_jagged([e[f] for f in cfg.history_features]).values()  # [S, I_g]
        rows = row_ids(lengths, h.size(0))  # [S]
        score = (h * t[rows]).sum(-1) / h.size(-1) ** 0.5  # [S]
        indices, valid = jagged_topk(score, lengths, cfg.top_k)
        # Auxiliary CTR task for the gsu tables: softmax(score)-pooled history . target (segment softmax).
        row_max = torch.full_like(t[:, 0], -1e30).scatter_reduce(0, rows, score.detach(), reduce="amax")  # [B]
        w = torch.exp(score - row_max[rows])  # [S]
        denom = torch.zeros_like(row_max).index_add(0, rows, w).clamp(min=1e-12)  # [B]
        pooled = torch.zeros_like(t).index_add(0, rows, h * (w / denom[rows]).unsqueeze(-1))  # [B, I_g]
        aux = (pooled * t).sum(-1) + self.aux_bias  # [B]
        return SearchResult(indices=indices, valid=valid, scores=score.detach()), aux

    def run(self, batch: Batch) -> TwoStageOutput:
        cfg = self.cfg
        e = lookup_jagged(self.ec, batch.sparse_features, self.scalars + cfg.history_features)
        user = e[cfg.user_feature].values() if cfg.user_feature else None  # [B, D]
        target = torch.cat([e[f].values() for f in cfg.target_features], dim=-1)  # [B, I]
        hist = concat_jagged([e[f] for f in cfg.history_features])
        inherent, lengths = hist.values(), hist.lengths()  # [S, I], [B]
        ids, bucket = self._cross(batch)
        with torch.no_grad():  # the search is not differentiable: no [S, I_c] tensor enters the graph
            cross = self._cross_values(ids, bucket)  # [S, I_c] or None
        result, aux = self._search(batch, target, inherent, lengths, cross)
        # Only the K survivors are gathered and embedded with gradients (never an [S, D_v] concatenation).
        sel_inh, mask = gather_survivors(inherent, lengths, result)  # [B, K, I], [B, K]
        sel_cross = self._cross_values(
            [gather_survivors(x, lengths, result)[0] for x in ids],
            gather_survivors(bucket, lengths, result)[0] if bucket is not None else None,
        )  # [B, K, I_c] or None
        sel_val = sel_inh if sel_cross is None else torch.cat([sel_inh, sel_cross], dim=-1)  # [B, K, D_v]
        if cfg.esu == ESU.twin:
            long = self.esu(self.relevance.query(target), sel_inh, sel_val, mask, cross=sel_cross)  # [B, I]
        else:
            long = self.esu(target, sel_val, mask)  # [B, I]
        parts = ([user] if user is not None else []) + [target, long]
        crosses = [target * long]
        if self.short is not None:
            recent, recent_mask = last_n(inherent, lengths, cfg.short_history)  # [B, L_s, I]
            short = self.short(target, recent, recent_mask)  # [B, I]
            parts.append(short)
            crosses.append(target * short)
        if cfg.target_cross:
            parts += crosses
        logits = self.mlp(self.norm(torch.cat(parts, dim=-1)))  # [B, T]
        return TwoStageOutput(logits=logits, aux_logits=aux, search=result, lengths=lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns logits ``[B, T]``."""
        return self.run(batch).logits
