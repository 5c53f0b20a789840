"""Training schemes over the entire candidate space (exposed and unexposed candidates of each request).

Per candidate n of the batch: ``y_n`` the observed click (0 where not exposed), ``o_n`` the exposure flag,
``p_n`` the logged exposure propensity, ``w_n`` the request's weight (0 on padding requests). ``bce(z, t)`` is
the binary cross-entropy of logit ``z`` against a target ``t`` (for a soft pseudo label ``t`` minus its entropy
``H(t)``, i.e. ``KL(t || sigmoid(z))``: the same gradient, and 0 at a perfect fit; :func:`soft_bce`); ``mean_S`` a ``w``-weighted mean over
the candidates in S (E = exposed, U = unexposed, all = every candidate).

* ``exposed``: ``mean_E bce(z, y)``, the pointwise pre-ranker trained in the exposure space (DUET "w/o co").
* ``ips`` (Multi-IPS, Zhang et al. 2020): ``sum_n w_n o_n / p_n bce(z_n, y_n) / sum_n w_n``, an unbiased
  estimate of the entire-space loss when ``p`` is the logging policy's propensity (clipped below at
  ``propensity_floor``).
* ``dr_jl`` (doubly robust joint learning, Wang et al. 2019): an imputation head reads the model's
  representation (detached) and imputes a label ``t_n`` for every candidate; with ``e_n = bce(z_n, y_n)``
  and ``ê_n = bce(z_n, t_n)``: the model minimises ``mean_all [ê_n + o_n / p_n (e_n - ê_n)]`` (``t``
  detached), the imputation head ``mean_all [o_n / p_n (e_n - ê_n)^2]`` (``z`` detached).
* ``ukd`` (single-model pseudo labels, after UKD, Xu et al. 2022): a teacher (the sub-model not served)
  learns ``mean_E bce(z_T, y)``; the student (``serve``) learns ``mean_E bce(z_S, y) + pseudo_weight *
  mean_U c_n bce(z_S, sigmoid(z_T))`` with the teacher's prediction detached and weighted by its confidence
  ``c_n = |2 sigmoid(z_T) - 1|`` (UKD weighs by an MC-dropout uncertainty; the confidence is the one-pass
  stand-in). One direction only: the teacher never learns from the student.
* ``cotrain`` (DUET Sec. 3.3): models A and B, independently initialised, each learns ``mean_E bce(z, y) +
  pseudo_weight * mean_U bce(z, sigmoid(z_other))`` with the other model's prediction detached (no gradient
  reaches a model through the pseudo labels it is given, nor through the ones it gives), plus ``kl_weight *
  mean_all [KL(P_A || P_B) + KL(P_B || P_A)]``, which trains both.

Evaluation rows are the candidates of the served model, grouped by request, with the users for the per-user
AUC; the tasks (:func:`preranking_tasks`) are the observed click twice: ``<label>`` over the exposed candidates
only (AUC and per-user AUC in the exposure space, the metric that picks the best checkpoint: real logs have
no other labels) and ``<label>@all`` over every candidate, unexposed ones counting as not clicked (RecFlow's
pre-ranking protocol: Recall@K and NDCG@K of the request's candidate list); then every other sequence label of
the schema over every candidate (``cand_exposed``: does the model rank what was shown first;
``cand_true_click`` in synthetic data: the entire-space AUC, every label known).

Shapes: B requests, N candidates in the batch, T tasks (the schema's sequence labels), F representation width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from datasets.batch import Batch
from datasets.schema import SchemaConfig
from models.base import TrainOutput, symmetric_kl
from models.duet.model import PreRanker, PreRankerConfig, Scores, Training
from modules.mlp import MLP

TWO_MODELS = (Training.ukd, Training.cotrain)


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``bce(z, t) - H(t)`` per element for a detached soft target ``t``: the KL divergence ``KL(t || sigmoid(z))``.

    Its gradient in ``z`` is the BCE's (``sigmoid(z) - t``); subtracting the target's entropy (constant in
    ``z``) makes a perfect fit read 0 instead of ``H(t)``, so the pseudo-label parts of the loss fall to 0 as the
    models agree.
    """
    t = target.detach()
    entropy = F.binary_cross_entropy(t, t, reduction="none")  # [N] H(t), 0 at t in {0, 1}
    return F.binary_cross_entropy_with_logits(logits, t, reduction="none") - entropy


def preranking_tasks(cfg: PreRankerConfig, schema: SchemaConfig) -> list[str]:
    """The evaluation tasks (module docstring): ``[label, label@all, other sequence labels...]``."""
    return [cfg.label, f"{cfg.label}@all", *(f.name for f in schema.sequence_labels if f.name != cfg.label)]


def _wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum(x * w) / max(sum(w), 1)`` (0 when no row has weight)."""
    return (x * w).sum() / w.sum().clamp(min=1.0)


class PreRankingModel(nn.Module):
    """The sub-models of a pre-ranking entry: ``a`` (and ``b`` for ``ukd`` / ``cotrain``, tables ``__a`` /
    ``__b``), and DR-JL's imputation head.

    Args:
        cfg: the model config.
        schema: the request-level schema.
        device: where the parameters are created (``meta`` on the sharding path).
    """

    def __init__(self, cfg: PreRankerConfig, schema: SchemaConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if schema.labels:
            raise ValueError(
                f"{cfg.name}: request-level data has per-candidate labels only; set data.schema.labels: [] (got"
                f" {list(schema.labels)})"
            )
        two = cfg.training in TWO_MODELS
        self.cfg = cfg
        self.a = PreRanker(cfg, schema, "a" if two else None, device)
        self.b = PreRanker(cfg, schema, "b", device) if two else None
        self.imputation = (
            MLP(self._hidden_width(cfg, schema), cfg.tower_hidden, out_features=1, device=device)
            if cfg.training == Training.dr_jl else None
        )
        self.tasks = preranking_tasks(cfg, schema)

    @staticmethod
    def _hidden_width(cfg: PreRankerConfig, schema: SchemaConfig) -> int:
        d = cfg.embedding_dim
        u, i, c = d * len(cfg.user_features), d * len(cfg.candidate_features), d * len(cfg.cross_features)
        if cfg.arch.value == "duet":
            return i + cfg.model_dim * (2 if cfg.set_attention else 1) + u + c
        return 2 * cfg.tower_dim + (c if cfg.arch.value == "three_tower" else 0)

    def served(self) -> PreRanker:
        """The sub-model evaluation scores with (``serve``; the student of ``ukd``)."""
        if self.b is None:
            return self.a
        return self.a if self.cfg.serve == "a" else self.b

    def forward(self, batch: Batch) -> torch.Tensor:
        """Serving: the served sub-model's logits ``[N]``, candidates in batch order (:meth:`PreRanker.score`)."""
        return self.served().score(batch)


class PreRankingTrainModule(nn.Module):
    """The loss of ``model.training`` (module docstring) and the evaluation rows.

    Args:
        model: a :class:`PreRankingModel`.
    """

    def __init__(self, model: PreRankingModel) -> None:
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.training_scheme = cfg.training
        self.label, self.exposure, self.propensity = cfg.label, cfg.exposure, cfg.propensity
        self.floor = cfg.propensity_floor
        self.pseudo_weight, self.kl_weight = cfg.pseudo_weight, cfg.kl_weight
        self.serve_b = model.b is not None and cfg.serve == "b"
        self.tasks = list(model.tasks)
        # The label column each task reads (``<label>@all`` reads ``<label>``).
        self.task_labels = [cfg.label if t == f"{cfg.label}@all" else t for t in self.tasks]
        self.user_feature = cfg.user_features[0] if cfg.user_features else None

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        seq = batch.sequence_labels
        y = seq[self.label].values()  # [N]
        o = seq[self.exposure].values()  # [N]
        lengths = seq[self.label].lengths()  # [B]
        w = torch.repeat_interleave(batch.weights, lengths)  # [N] 0 on padding requests
        exposed, unexposed = w * o, w * (1.0 - o)  # [N], [N]
        parts: dict[str, torch.Tensor] = {}
        scheme = self.training_scheme
        a = self.model.a(batch)
        if scheme == Training.exposed:
            loss = _wmean(F.binary_cross_entropy_with_logits(a.logits, y, reduction="none"), exposed)
            parts["bce"] = loss
            served = a
        elif scheme == Training.ips:
            q = 1.0 / seq_propensity(batch, self.propensity).clamp(min=self.floor)  # [N]
            loss = _wmean(F.binary_cross_entropy_with_logits(a.logits, y, reduction="none") * o * q, w)
            parts["ips"] = loss
            served = a
        elif scheme == Training.dr_jl:
            loss = self._dr_jl(batch, a, y, o, w, parts)
            served = a
        else:
            b = self.model.b(batch)
            served, other = (b, a) if self.serve_b else (a, b)
            if scheme == Training.ukd:  # the served model is the student, the other its teacher
                loss = self._ukd(served.logits, other.logits, y, exposed, unexposed, parts)
            else:
                loss = self._cotrain(a.logits, b.logits, y, w, exposed, unexposed, parts)
        return loss, self._output(batch, served, loss, parts, o, lengths)

    def _dr_jl(
        self, batch: Batch, a: Scores, y: torch.Tensor, o: torch.Tensor, w: torch.Tensor,
        parts: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        q = 1.0 / seq_propensity(batch, self.propensity).clamp(min=self.floor)  # [N]
        imputed = self.model.imputation(a.hidden.detach()).squeeze(-1)  # [N] logit of the imputed label
        e = F.binary_cross_entropy_with_logits(a.logits, y, reduction="none")  # [N]
        e_hat = F.binary_cross_entropy_with_logits(a.logits, torch.sigmoid(imputed).detach(), reduction="none")
        pred = _wmean(e_hat + o * q * (e - e_hat), w)
        e_hat_imp = F.binary_cross_entropy_with_logits(a.logits.detach(), torch.sigmoid(imputed), reduction="none")
        imp = _wmean(o * q * (e.detach() - e_hat_imp) ** 2, w)
        parts.update(dr=pred, imputation=imp)
        return pred + imp

    def _ukd(
        self, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, exposed: torch.Tensor,
        unexposed: torch.Tensor, parts: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        bce_t = _wmean(F.binary_cross_entropy_with_logits(teacher, y, reduction="none"), exposed)
        bce_s = _wmean(F.binary_cross_entropy_with_logits(student, y, reduction="none"), exposed)
        p_t = torch.sigmoid(teacher).detach()  # [N] the teacher's soft pseudo labels
        conf = (2.0 * p_t - 1.0).abs()  # [N]
        pseudo = _wmean(soft_bce(student, p_t) * conf, unexposed)
        parts.update(bce_teacher=bce_t, bce_student=bce_s, pseudo=pseudo)
        return bce_t + bce_s + self.pseudo_weight * pseudo

    def _cotrain(
        self, za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, w: torch.Tensor, exposed: torch.Tensor,
        unexposed: torch.Tensor, parts: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        bce_a = _wmean(F.binary_cross_entropy_with_logits(za, y, reduction="none"), exposed)
        bce_b = _wmean(F.binary_cross_entropy_with_logits(zb, y, reduction="none"), exposed)
        # Each model's unexposed candidates are labelled by the other model, detached.
        pseudo_a = _wmean(soft_bce(za, torch.sigmoid(zb).detach()), unexposed)
        pseudo_b = _wmean(soft_bce(zb, torch.sigmoid(za).detach()), unexposed)
        kl = symmetric_kl(za, zb, w)
        parts.update(bce_a=bce_a, bce_b=bce_b, pseudo_a=pseudo_a, pseudo_b=pseudo_b, kl=kl)
        return bce_a + bce_b + self.pseudo_weight * (pseudo_a + pseudo_b) + self.kl_weight * kl

    def _output(
        self, batch: Batch, served: Scores, loss: torch.Tensor, parts: dict[str, torch.Tensor],
        o: torch.Tensor, lengths: torch.Tensor,
    ) -> TrainOutput:
        n = served.logits.size(0)
        labels = torch.stack([batch.sequence_labels[name].values() for name in self.task_labels], dim=1)  # [N, T]
        valid = torch.repeat_interleave(batch.valid, lengths)  # [N]
        masks = [valid & (o > 0.5) if name == self.label else valid for name in self.tasks]
        users = None
        if self.user_feature is not None:
            users = torch.repeat_interleave(batch.sparse_features[self.user_feature].values(), lengths)  # [N]
        return TrainOutput(
            loss=loss.detach(),
            logits=served.logits.detach().unsqueeze(1).expand(n, len(self.tasks)),
            labels=labels,
            groups=torch.repeat_interleave(batch.group_ids, lengths),
            mask=torch.stack(masks, dim=1),
            loss_parts={k: v.detach() for k, v in parts.items()},
            users=users,
        )


def seq_propensity(batch: Batch, name: Optional[str]) -> torch.Tensor:
    """The candidates' logged propensities ``[N]`` (a float sequence of the batch)."""
    if name is None:
        raise ValueError("this training scheme needs model.propensity")
    return batch.float_sequences[name].values()


def build_preranking_train_module(model: PreRankingModel, cfg: PreRankerConfig) -> PreRankingTrainModule:
    """The ``build_train_module`` of the pre-ranking entries."""
    return PreRankingTrainModule(model)
