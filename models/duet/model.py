"""Request-level pre-rankers over the entire candidate space: DUET's set-level model and the tower baselines.

One sub-model class, :class:`PreRanker`, scores every candidate of every request in one pass; ``arch`` picks
the math:

* ``duet`` (Xiao et al., DUET: Dual Model Co-Training for Entire Space CTR Prediction, Sec. 3.2): the
  candidates ``F_can [B, M, D_i]`` attend over the behaviour sequence, ``F_c-s = LinearAttn(F_can, F_seq,
  F_seq)``, and over each other, ``F_c-c = LinearAttn(F_can, F_can, F_can)`` (:class:`SetLinearAttention`:
  degree-normalised linear attention, cost linear in M and N), and an MLP over ``[F_can, F_c-s, F_c-c, F_u,
  F_cro]`` gives each candidate's logit. The paper's concatenation lists ``[F_c-s, F_c-c, F_u, F_cro]``; the
  candidate's own features ``F_can`` are added here (the attention outputs mix other items' values, so
  without them the MLP would see the candidate only through attention weights). ``set_attention: false``
  drops ``F_c-c`` (the ablation "w/o set": no candidate-to-candidate interaction);
* ``two_tower``: ``<tower_u([F_u, mean F_seq]), tower_i(F_can)> + b``, pointwise (the pre-ranking baseline);
* ``three_tower``: the two towers plus a cross tower ``tower_c(F_cro) -> 1`` added to the logit.

Features: ``user_features`` (scalar ids), ``history_features`` (the behaviour items, the most recent
``history_length`` kept), ``candidate_features`` (the candidates' item features, aligned with the history
features: the i-th of each describes the same attribute, sharing a table when the schema says so) and
``cross_features`` (per-candidate user-item cross ids, e.g. ``cand_cross``). One EmbeddingCollection per
sub-model holds its tables at width D; a ``role`` names them apart (``t_item_id__a`` / ``t_item_id__b``) when
a train module holds two sub-models.

Shapes: B requests, N candidates in the batch (sum of the candidate counts), M the batch's longest candidate
list, L history length kept, D embedding dim, U = D * (user features), I = D * (item features),
C = D * (cross features), A the attention width (``model_dim``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from modules.embedding import build_embedding_collection, concat_jagged, lookup_jagged
from modules.folded_head import SCORE_TILE, score_folded
from modules.linear_attention import SetLinearAttention
from modules.mlp import MLP
from modules.sequence import last_n, masked_mean, pad_jagged


class Arch(str, enum.Enum):
    """The scoring math of a :class:`PreRanker` (YAML ``model.arch``)."""

    duet = "duet"
    two_tower = "two_tower"
    three_tower = "three_tower"


class Training(str, enum.Enum):
    """How the train module uses exposed and unexposed candidates (YAML ``model.training``); see
    :mod:`models.duet.train`."""

    exposed = "exposed"  # BCE on exposed candidates only (the pointwise baseline; DUET "w/o co")
    ips = "ips"  # exposed candidates weighted by 1 / logged propensity, over all candidates (Multi-IPS)
    dr_jl = "dr_jl"  # doubly robust joint learning: an imputed error for every candidate, IPS-corrected
    ukd = "ukd"  # single-model pseudo labels: teacher A (exposed only) labels the unexposed for student B
    cotrain = "cotrain"  # DUET: models A and B label each other's unexposed candidates, + KL consistency


@dataclass
class PreRankerConfig:
    """The ``model:`` section of the pre-ranking entries (``duet``, ``two_tower``, ``three_tower``).

    Attributes:
        name: registry key.
        arch: the scoring math (:class:`Arch`).
        training: the training scheme (:class:`Training`).
        embedding_dim: D, every table's width.
        user_features: scalar user id features (F_u).
        history_features: behaviour sequence features (F_seq), aligned with ``candidate_features``.
        candidate_features: the candidates' item features (F_can), one sequence group.
        cross_features: per-candidate user-item cross id features (F_cro), the candidates' group; may be empty
            for ``duet`` / ``two_tower``; ``three_tower`` needs one.
        history_length: L, the most recent behaviours read (the reader drops older ones; DUET uses 200).
        model_dim: A, the width of the set attention's projections (``duet``).
        heads: attention heads of the set attention.
        feature_map: phi of the linear attention (``elu1``: elu(x) + 1).
        attention: ``linear`` (DUET) or ``softmax`` (the same head with quadratic softmax attention).
        set_attention: ``duet`` only: keep the candidate-to-candidate attention F_c-c (false: "w/o set").
        tower_dim: output width of the user and item towers (``two_tower`` / ``three_tower``).
        tower_hidden: hidden widths of each tower.
        mlp_hidden: hidden widths of DUET's prediction MLP (and of the cross tower).
        label: the observed click, a sequence label of the candidates (0 where not exposed).
        exposure: the exposure flag, a sequence label of the candidates (1 = exposed).
        propensity: the logged exposure probability, a float sequence of the candidates (``ips``, ``dr_jl``).
        propensity_floor: propensities are clipped to at least this before 1 / p.
        pseudo_weight: weight of the pseudo-labelled (unexposed) loss against the exposed one (``ukd``,
            ``cotrain``).
        kl_weight: lambda of the symmetric KL term (``cotrain``; 0 = DUET "w/o KL").
        serve: the sub-model evaluation (and serving) uses, ``a`` or ``b`` (two-model schemes).
    """

    name: str = "duet"
    arch: Arch = Arch.duet
    training: Training = Training.cotrain
    embedding_dim: int = 16
    user_features: list[str] = field(default_factory=lambda: ["user_id"])
    history_features: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category"])
    candidate_features: list[str] = field(default_factory=lambda: ["cand_item_id", "cand_category"])
    cross_features: list[str] = field(default_factory=lambda: ["cand_cross"])
    history_length: int = 200
    model_dim: int = 32
    heads: int = 1
    feature_map: str = "elu1"
    attention: str = "linear"
    set_attention: bool = True
    tower_dim: int = 32
    tower_hidden: list[int] = field(default_factory=lambda: [64])
    mlp_hidden: list[int] = field(default_factory=lambda: [128, 64])
    label: str = "cand_click"
    exposure: str = "cand_exposed"
    propensity: Optional[str] = "cand_propensity"
    propensity_floor: float = 0.01
    pseudo_weight: float = 1.0
    kl_weight: float = 0.1
    serve: str = "a"


def check_preranking_schema(cfg: PreRankerConfig, schema: SchemaConfig) -> None:
    """Raises ValueError (KeyError for unknown features) when the schema does not carry what ``cfg`` reads."""
    if not cfg.candidate_features or len(cfg.history_features) != len(cfg.candidate_features):
        raise ValueError(
            f"{cfg.name}: candidate_features {cfg.candidate_features} and history_features {cfg.history_features}"
            " must be non-empty and aligned one to one"
        )
    if not cfg.user_features:
        raise ValueError(f"{cfg.name}: user_features must name at least one scalar id feature (F_u; the first is"
                         " the user of the per-user AUC)")
    for name in cfg.user_features:
        if schema.id_feature(name).sequence:
            raise ValueError(f"{cfg.name}: user feature {name} must be a scalar id feature")
    def groups(names: list[str]) -> set[Optional[str]]:
        return {schema.id_feature(n).group if schema.id_feature(n).sequence else None for n in names}

    hist, cand = groups(cfg.history_features), groups([*cfg.candidate_features, *cfg.cross_features])
    if len(hist) != 1 or len(cand) != 1 or None in hist | cand or hist == cand:
        raise ValueError(
            f"{cfg.name}: history_features must be sequences of one group and candidate_features + cross_features"
            f" sequences of another (the candidates'); groups found: history {sorted(map(str, hist))},"
            f" candidates {sorted(map(str, cand))} (None = a scalar feature)"
        )
    group = cand.pop()
    labels = {f.name: f.group for f in schema.sequence_labels}
    for what, name in (("label", cfg.label), ("exposure", cfg.exposure)):
        if labels.get(name) != group:
            raise ValueError(
                f"{cfg.name}: model.{what} {name!r} must be a sequence label of group {group!r}; the schema's"
                f" sequence labels are {labels}"
            )
    if cfg.training in (Training.ips, Training.dr_jl):
        floats = {f.name: f.group for f in schema.float_sequences}
        if cfg.propensity is None or floats.get(cfg.propensity) != group:
            raise ValueError(
                f"{cfg.name}: training {cfg.training.value} needs model.propensity, a float sequence of group"
                f" {group!r} (the logged exposure probability); the schema's float sequences are {floats}"
            )
    if cfg.arch == Arch.three_tower and not cfg.cross_features:
        raise ValueError(f"{cfg.name}: three_tower needs cross_features (the cross tower's input)")
    if cfg.serve not in ("a", "b"):
        raise ValueError(f"{cfg.name}: model.serve must be 'a' or 'b', got {cfg.serve!r}")
    if cfg.attention not in ("linear", "softmax"):
        raise ValueError(f"{cfg.name}: model.attention must be 'linear' or 'softmax', got {cfg.attention!r}")
    if not 0 < cfg.propensity_floor <= 1:
        raise ValueError(f"{cfg.name}: model.propensity_floor must be in (0, 1], got {cfg.propensity_floor}")


def candidate_group(cfg: PreRankerConfig, schema: SchemaConfig) -> str:
    """The candidates' sequence group."""
    return schema.id_feature(cfg.candidate_features[0]).group


@dataclass
class Scores:
    """What a :class:`PreRanker` returns.

    Attributes:
        logits: ``[N]`` one per candidate, in batch order.
        lengths: ``[B]`` candidates per request.
        hidden: ``[N, F]`` the representation the logit is read from (detached by users such as DR-JL's
            error imputation).
    """

    logits: torch.Tensor
    lengths: torch.Tensor
    hidden: torch.Tensor


class PreRanker(nn.Module):
    """One request-level pre-ranker (module docstring); scores every candidate of the batch.

    Args:
        cfg: the model config.
        schema: a request-level schema (:func:`check_preranking_schema`).
        role: the tables' role (``a`` / ``b`` for two sub-models; None: ``t_<table>``).
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(
        self, cfg: PreRankerConfig, schema: SchemaConfig, role: Optional[str], device: Optional[torch.device]
    ) -> None:
        super().__init__()
        check_preranking_schema(cfg, schema)
        d = cfg.embedding_dim
        self.cfg = cfg
        self.features = [*cfg.user_features, *cfg.history_features, *cfg.candidate_features, *cfg.cross_features]
        self.ec = build_embedding_collection(schema, self.features, d, device, role=role)
        u, i, c = d * len(cfg.user_features), d * len(cfg.candidate_features), d * len(cfg.cross_features)
        self.arch = cfg.arch
        if cfg.arch == Arch.duet:
            a = cfg.model_dim
            kw = dict(heads=cfg.heads, feature_map=cfg.feature_map, attention=cfg.attention, device=device)
            self.c2s = SetLinearAttention(i, i, i, a, **kw)
            self.c2c = SetLinearAttention(i, i, i, a, **kw) if cfg.set_attention else None
            width = i + a + (a if cfg.set_attention else 0) + u + c
            self.blocks = [i, a, *([a] if cfg.set_attention else []), u, c]  # the MLP input's parts, in order
            self.mlp = MLP(width, cfg.mlp_hidden, out_features=1, device=device)
        else:
            self.user_tower = MLP(u + i, cfg.tower_hidden, out_features=cfg.tower_dim, device=device)
            self.item_tower = MLP(i, cfg.tower_hidden, out_features=cfg.tower_dim, device=device)
            self.bias = nn.Parameter(torch.zeros(1, device=device))
            self.cross_tower = (
                MLP(c, cfg.mlp_hidden, out_features=1, device=device) if cfg.arch == Arch.three_tower else None
            )

    def reset_parameters(self) -> None:
        """Zero logit bias (DMP calls this after materialising a ``meta`` model)."""
        if self.arch != Arch.duet:
            nn.init.zeros_(self.bias)

    def _inputs(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Looked-up features: user ``[B, U]``, history ``[B, L, I]`` and its mask ``[B, L]``, candidates
        ``[N, I]``, candidate counts ``[B]``, cross ``[N, C]``."""
        cfg = self.cfg
        e = lookup_jagged(self.ec, batch.sparse_features, self.features)
        user = torch.cat([e[f].values() for f in cfg.user_features], dim=-1)  # [B, U]
        behaviours = concat_jagged([e[f] for f in cfg.history_features])  # values [S, I], lengths [B]
        history, h_mask = last_n(behaviours.values(), behaviours.lengths(), cfg.history_length)  # [B, L, I]
        cand = concat_jagged([e[f] for f in cfg.candidate_features])  # values [N, I], lengths [B]
        items = cand.values()  # [N, I]
        if cfg.cross_features:
            cross = torch.cat([e[f].values() for f in cfg.cross_features], dim=-1)  # [N, C]
        else:
            cross = items.new_zeros((items.size(0), 0))  # [N, 0]
        return user, history, h_mask, items, cand.lengths(), cross

    def forward(self, batch: Batch) -> Scores:
        cfg = self.cfg
        user, history, h_mask, items, lengths, cross = self._inputs(batch)
        users = torch.repeat_interleave(user, lengths, dim=0)  # [N, U]
        if self.arch == Arch.duet:
            f_can, c_mask = pad_jagged(items, lengths)  # [B, M, I], [B, M]
            c2s = self.c2s(f_can, history, history, c_mask, h_mask)[c_mask]  # [N, A]
            parts = [items, c2s]
            if self.c2c is not None:
                parts.append(self.c2c(f_can, f_can, f_can, c_mask, c_mask)[c_mask])  # [N, A]
            hidden = torch.cat(parts + [users, cross], dim=-1)  # [N, I + A (+ A) + U + C]
            logits = self.mlp(hidden).squeeze(-1)  # [N]
        else:
            u = self.user_tower(torch.cat([user, masked_mean(history, h_mask)], dim=-1))  # [B, tower_dim]
            v = self.item_tower(items)  # [N, tower_dim]
            u = torch.repeat_interleave(u, lengths, dim=0)  # [N, tower_dim]
            logits = (u * v).sum(-1) + self.bias  # [N]
            hidden = torch.cat([u, v], dim=-1)  # [N, 2 tower_dim]
            if self.cross_tower is not None:
                logits = logits + self.cross_tower(cross).squeeze(-1)  # [N]
                hidden = torch.cat([hidden, cross], dim=-1)
        return Scores(logits=logits, lengths=lengths, hidden=hidden)

    def score(self, batch: Batch, tile: int = SCORE_TILE) -> torch.Tensor:
        """Serving: the logits ``[N]`` of :meth:`forward` (equal up to float rounding), computed faster.

        ``duet``: the embedding lookups, then :meth:`head_logits`. The towers score as in :meth:`forward`.
        """
        if self.arch != Arch.duet:
            return self(batch).logits
        user, history, h_mask, items, lengths, cross = self._inputs(batch)
        f_can, c_mask = pad_jagged(items, lengths)  # [B, M, I], [B, M]
        f_cro = pad_jagged(cross, lengths)[0] if cross.size(-1) else None  # [B, M, C]
        logits = self.head_logits(user, history, h_mask, f_can, c_mask, f_cro, tile)  # [B, M]
        return logits[c_mask]  # [N]

    def head_logits(
        self,
        user: torch.Tensor,
        history: torch.Tensor,
        h_mask: torch.Tensor,
        f_can: torch.Tensor,
        c_mask: torch.Tensor,
        f_cro: Optional[torch.Tensor],
        tile: int = SCORE_TILE,
    ) -> torch.Tensor:
        """The set head on looked-up features (``duet``): logits ``[B, M]`` (padding slots unspecified).

        The MLP's first layer over ``[F_can, F_c-s, F_c-c, F_u, F_cro]`` becomes a sum of column-block products
        (:meth:`modules.mlp.MLP.first_blocks`), with each attention's block folded into its per-request state
        (:meth:`SetLinearAttention.fold_keys`) and the user block computed once per request: no concatenation,
        no attention output or ``W_o`` product per candidate, no user features repeated per candidate. The
        candidates then run through :func:`modules.folded_head.score_folded` in steps of ``tile`` rows (one
        product for both attentions' queries, one for both states). In softmax mode the same fold applies (the
        same head, for the latency comparison).

        Args:
            user: ``[B, U]``; history ``[B, L, I]`` and h_mask ``[B, L]``; f_can ``[B, M, I]`` and c_mask
                ``[B, M]``; f_cro ``[B, M, C]`` or None without cross features.
        """
        w_i, w_cs, *w_cc, w_u, w_c = self.mlp.first_blocks(self.blocks)  # [F, width] each
        parts = [(self.c2s, self.c2s.fold_keys(w_cs, history, history, h_mask))]
        if self.c2c is not None:
            parts.append((self.c2c, self.c2c.fold_keys(w_cc[0], f_can, f_can, c_mask)))
        bias = nn.functional.linear(user, w_u, self.mlp.layers[0].bias)  # [B, F]: F_u's block, once per request
        for _, keys in parts:
            bias = bias + keys.per_request
        blocks = [(f_can, w_i)] + ([(f_cro, w_c)] if f_cro is not None else [])
        return score_folded(parts, f_can, c_mask, blocks, bias, self.mlp, tile)  # [B, M]

