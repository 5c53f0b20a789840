"""DARE (Feng et al. 2025, ICLR): decoupled attention and representation embeddings, with the baselines of its
Table 1 as variants of the same model.

``logit_i = <e_i^att, v_t^att> / sqrt(A) + b(time_i)`` ranks every behaviour (the GSU keeps the top K by it: the
same relevance as the ESU, TWIN-style consistency); the ESU weights the survivors ``w_i = softmax_i(logit_i)``;
the user representation is ``h = sum_i w_i (e_i^repr ⊙ v_t^repr)`` (target-aware); the MLP reads
``[v_t^repr, h, v_t^repr ⊙ h]``. Gradients of the attention path reach only the attention tables, those of the
representation path only the representation tables. With ``time_mode: embed`` the time bucket is a decoupled
feature like the items (its attention embedding in ``e^att``, its representation embedding in ``e^repr``, the
target at bucket 0) instead of the bias ``b``.

Variants (``model.tables``, ``model.projection``, ``model.target_aware``, ``model.search``):

=================  ======  ==========  ============  ======
entry               tables  projection  target_aware  search
=================  ======  ==========  ============  ======
DARE                2       false       true          soft
TWIN (shared)       1       false       true          soft
TWIN (hard)         1       false       true          hard
TWIN w/ proj        1       true        true          soft
TWIN w/o TR         1       false       false         soft
TWIN-4E             4       false       true          soft
=================  ======  ==========  ============  ======

Shapes: B batch, S behaviours in the batch, K survivors, A attention width, R representation width, T tasks.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from models.common import check_search_features, require_sample_labels
from models.twin.model import TwoStageOutput
from modules.decoupled import DecoupledBuckets, DecoupledEmbedding
from modules.embedding import build_embedding_collection, lookup_jagged
from modules.mlp import MLP, Activation
from modules.search import SearchResult, hard_search, log2_time_buckets, row_ids
from modules.sequence import jagged_topk, select_jagged
from modules.target_attention import masked_softmax

torch.fx.wrap("masked_softmax")


class ZeroInitEmbedding(nn.Embedding):
    """An ``nn.Embedding`` that starts at 0 (DMP materialises meta modules through ``reset_parameters``)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class DareSearch(str, enum.Enum):
    soft = "soft"
    hard = "hard"


class TimeMode(str, enum.Enum):
    bias = "bias"
    embed = "embed"


@dataclass
class DAREConfig:
    """The ``model:`` section of a DARE run (and of its Table 1 baselines).

    Attributes:
        name: registry key (``dare``).
        attn_dim: d_att, width of each item feature's attention embedding.
        repr_dim: d_repr, width of each item feature's representation embedding.
        tables: 2 (DARE: attention and representation tables), 1 (one shared table: TWIN), 4 (TWIN-4E).
        projection: linear maps to Q, K and V of the shared embeddings (TWIN w/ proj; needs ``tables: 1``).
        target_aware: ``h = sum_i w_i (e_i ⊙ v_t)``; False: ``sum_i w_i e_i`` (TWIN w/o TR).
        search: ``soft`` (top K by the attention logit) or ``hard`` (behaviours of the target's category).
        top_k: K.
        attn_temperature: T, the attention logit is ``<e_i^att, v_t^att> / (sqrt(d_att) T)`` (1: the paper's). A
            larger T makes the ESU's softmax flatter at the same embeddings (README, DARE: why dim 64 differs).
        user_feature: scalar user id feature (None: none), embedded at ``repr_dim``.
        target_features: scalar item features of the target, item id first.
        history_features: behaviour features aligned with them.
        time_feature: float behaviour feature, seconds to the request, bucketed by log2 (None: none).
        time_mode: how the time bucket enters: ``bias``, a learned 1-d bias per bucket in the attention logit;
            ``embed``, decoupled time tables like the item features' (the official DARE code's ``use_time``
            concat): the bucket's attention embedding (``attn_dim``) joins the attention keys, its
            representation embedding (``repr_dim``) the values, and the target is at bucket 0 (now).
        time_buckets: rows of that bias or of each time table.
        long_history: the most recent behaviours searched (0: all the reader gives).
        hard_search_feature: behaviour feature matched against ``hard_target_feature`` (``search: hard``).
        hard_target_feature: the target's feature for the hard search.
        target_cross: also feed ``v_t^repr ⊙ h`` to the MLP.
        mlp_batch_norm: batch-normalise the MLP input.
        mlp_hidden: hidden widths of the prediction MLP.
        activation: activation of the MLP.
        dropout: dropout after each hidden layer.
        relevance_feature: the data's true per-behaviour relevance (synthetic ``hist_relevance``): evaluation
            reports the GSU's NDCG@K / recall@K against it. Never an input.
    """

    name: str = "dare"
    attn_dim: int = 16
    repr_dim: int = 16
    tables: int = 2
    projection: bool = False
    target_aware: bool = True
    search: DareSearch = DareSearch.soft
    top_k: int = 100
    attn_temperature: float = 1.0
    user_feature: Optional[str] = None
    target_features: list[str] = field(default_factory=lambda: ["item_id", "item_category"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    time_feature: Optional[str] = "hist_time_delta"
    time_mode: TimeMode = TimeMode.bias
    time_buckets: int = 32
    long_history: int = 0
    hard_search_feature: str = "hist_category"
    hard_target_feature: str = "item_category"
    target_cross: bool = True
    mlp_batch_norm: bool = True
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = Activation.prelu
    dropout: float = 0.0
    relevance_feature: Optional[str] = None


def _check(cfg: DAREConfig, schema: SchemaConfig) -> None:
    hard = (cfg.hard_search_feature, cfg.hard_target_feature) if cfg.search == DareSearch.hard else None
    check_search_features(schema, cfg.target_features, cfg.history_features, [cfg.time_feature, cfg.relevance_feature], hard)
    if cfg.projection and cfg.tables != 1:
        raise ValueError("projection (TWIN w/ proj) projects one shared table: it needs tables: 1")
    if cfg.top_k <= 0 or cfg.long_history < 0:
        raise ValueError("top_k must be > 0 and long_history >= 0")
    if not cfg.attn_temperature > 0:
        raise ValueError(f"attn_temperature must be > 0, got {cfg.attn_temperature}")


class DARE(nn.Module):
    """DARE and its Table 1 baselines (see the module docstring).

    Args:
        cfg: the model config.
        schema: the data schema.
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: DAREConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check(cfg, schema)
        self.cfg = cfg
        self.items = DecoupledEmbedding(
            schema, cfg.target_features, cfg.history_features, cfg.attn_dim, cfg.repr_dim, cfg.tables, device
        )
        a, r = self.items.attn_width, self.items.repr_width
        self.time_tables: Optional[DecoupledBuckets] = None
        if cfg.time_feature and cfg.time_mode == TimeMode.embed:
            self.time_tables = DecoupledBuckets(cfg.time_buckets, cfg.attn_dim, cfg.repr_dim, cfg.tables, device)
            a, r = a + cfg.attn_dim, r + cfg.repr_dim
        self.user_ec = (
            build_embedding_collection(schema, [cfg.user_feature], cfg.repr_dim, device) if cfg.user_feature else None
        )
        # 0 at init: a random time bias would decide the first searches (see modules.search.TwinRelevance).
        bias = cfg.time_feature and cfg.time_mode == TimeMode.bias
        self.time_bias = ZeroInitEmbedding(cfg.time_buckets, 1, device=device) if bias else None
        if cfg.projection:
            self.w_q = nn.Linear(a, a, bias=False, device=device)
            self.w_k = nn.Linear(a, a, bias=False, device=device)
            self.w_v = nn.Linear(r, r, bias=False, device=device)
        self.scale = 1.0 / (math.sqrt(a) * cfg.attn_temperature)
        width = (cfg.repr_dim if cfg.user_feature else 0) + (3 if cfg.target_cross else 2) * r
        self.norm: nn.Module = nn.BatchNorm1d(width, device=device) if cfg.mlp_batch_norm else nn.Identity()
        self.mlp = MLP(width, cfg.mlp_hidden, out_features=require_sample_labels(schema, "dare"),
                       activation=cfg.activation, dropout=cfg.dropout, device=device)

    def _buckets(self, batch: Batch) -> torch.Tensor:
        seconds = batch.float_sequences[self.cfg.time_feature].values()  # [S]
        return log2_time_buckets(seconds, self.cfg.time_buckets)  # [S]

    def _bias(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.time_bias is None:
            return None
        return self.time_bias(self._buckets(batch)).squeeze(-1)  # [S]

    def attention_inputs(self, batch: Batch):
        """``(views, query [B, A], keys [S, A], bias [S] or None)``: what the attention logits are made of."""
        v = self.items(batch.sparse_features)
        if self.time_tables is not None:
            now = torch.zeros(v.lengths.numel(), dtype=torch.long, device=v.lengths.device)  # [B] bucket 0
            v = self.time_tables.extend(v, now, self._buckets(batch))
        query, keys = v.target_attn, v.history_attn
        if self.cfg.projection:
            query, keys = self.w_q(query), self.w_k(keys)
        return v, query, keys, self._bias(batch)

    def _search(self, batch: Batch, query: torch.Tensor, keys: torch.Tensor, bias: Optional[torch.Tensor],
                lengths: torch.Tensor) -> SearchResult:
        cfg, kjt = self.cfg, batch.sparse_features
        if cfg.search == DareSearch.hard:
            return hard_search(kjt[cfg.hard_search_feature].values(), kjt[cfg.hard_target_feature].values(),
                               lengths, cfg.top_k)
        rows = row_ids(lengths, keys.size(0))  # [S]
        with torch.no_grad():
            score = (keys.detach() * query.detach()[rows]).sum(-1) * self.scale  # [S]
            if bias is not None:
                score = score + bias.detach()
            indices, valid = jagged_topk(score, lengths, cfg.top_k)
        return SearchResult(indices=indices, valid=valid, scores=score)

    def attend(self, v, query: torch.Tensor, keys: torch.Tensor, bias: Optional[torch.Tensor],
               result: SearchResult) -> tuple[torch.Tensor, torch.Tensor]:
        """The ESU: ``(weights [B, K], values [B, K, R])``; ``h = sum_k weights_k values_k``.

        The weights come from the attention embeddings only, the values (``e_i^repr ⊙ v_t^repr``) from the
        representation embeddings only.
        """
        lengths = v.lengths
        sel_keys, mask = select_jagged(keys, lengths, result.indices, result.valid)  # [B, K, A]
        logits = (sel_keys * query.unsqueeze(1)).sum(-1) * self.scale  # [B, K], with gradients this time
        if bias is not None:
            logits = logits + select_jagged(bias.unsqueeze(-1), lengths, result.indices, result.valid)[0].squeeze(-1)
        weights = masked_softmax(logits, mask)  # [B, K]
        values = v.history_repr if not self.cfg.projection else self.w_v(v.history_repr)  # [S, R]
        sel_values, _ = select_jagged(values, lengths, result.indices, result.valid)  # [B, K, R]
        if self.cfg.target_aware:
            sel_values = sel_values * v.target_repr.unsqueeze(1)  # e_i ⊙ v_t
        return weights, sel_values

    def run(self, batch: Batch, cut: Optional[str] = None) -> TwoStageOutput:
        """The forward pass; ``cut`` (diagnostics only) stops the gradient of one path at the embeddings:
        ``"attention"`` (query and keys detached: only the representation path reaches the tables) or
        ``"representation"`` (target and behaviour representations detached)."""
        cfg = self.cfg
        v, query, keys, bias = self.attention_inputs(batch)
        if cut == "attention":
            query, keys = query.detach(), keys.detach()
        elif cut == "representation":
            v = replace(v, target_repr=v.target_repr.detach(), history_repr=v.history_repr.detach())
        elif cut is not None:
            raise ValueError(f"cut must be None, 'attention' or 'representation', got {cut!r}")
        lengths = v.lengths
        result = self._search(batch, query, keys, bias, lengths)
        weights, sel_values = self.attend(v, query, keys, bias, result)  # [B, K], [B, K, R]
        target = v.target_repr  # [B, R]
        h = (weights.unsqueeze(-1) * sel_values).sum(1)  # [B, R]
        parts = [target, h] + ([target * h] if cfg.target_cross else [])
        if self.user_ec is not None:
            parts.insert(0, lookup_jagged(self.user_ec, batch.sparse_features, [cfg.user_feature])[cfg.user_feature].values())
        out = self.mlp(self.norm(torch.cat(parts, dim=-1)))  # [B, T]
        return TwoStageOutput(logits=out, aux_logits=None, search=result, lengths=lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns logits ``[B, T]``."""
        return self.run(batch).logits
