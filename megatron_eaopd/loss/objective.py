"""The training objective as one object: what it needs from the teacher, the loss, how its metrics reduce.

The trainer talks to an :class:`Objective` only; it never branches on the loss's mode and holds no
metric rules. An objective declares its ``teacher_payload``:

* ``"signals"``: compact per-token teacher signals (target log-prob, entropy, top-k ids/log-probs,
  ``[B, S, k]``), computed once per iteration in the teacher phase, before the update;
* ``"logits"``: the teacher's vocab-parallel logits on the student's shards, produced per
  micro-batch inside the update step (exact full-vocabulary KLs).

and turns teacher logits into :class:`TeacherSignals` (:meth:`Objective.teacher_signals`), the
student's logits into ``(loss_sum, num_tokens, sums)`` in Megatron's per-token-loss convention
(:meth:`Objective.loss`), and summed metrics into means (:meth:`Objective.reduce`). Objectives are
registered in :data:`OBJECTIVES` (as verl registers its distillation losses); :func:`build_objective`
picks one from its configuration.
"""

from __future__ import annotations

from typing import Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch

from megatron_eaopd.loss.config import EOPDConfig
from megatron_eaopd.loss.eopd import eopd_loss_sums
from megatron_eaopd.loss.metrics import METRIC_DENOMINATORS, METRIC_KEYS, reduce_metric_sums
from megatron_eaopd.loss.quantile import global_quantile
from megatron_eaopd.loss.signals import TeacherSignals, teacher_signals
from megatron_eaopd.loss.vocab_parallel import vocab_parallel_log_probs

__all__ = ["TeacherPayload", "Objective", "EOPDObjective", "OBJECTIVES", "build_objective"]

TeacherPayload = Literal["signals", "logits"]


@runtime_checkable
class Objective(Protocol):
    """What the trainer needs from a distillation objective (all tensors on this rank).

    Attributes:
        teacher_payload: ``"signals"`` or ``"logits"`` (see the module docstring).
        metric_keys: names of the metrics it reports (besides ``loss`` and ``num_tokens``).
        sum_keys: every key of the ``sums`` that :meth:`loss` returns (what :meth:`reduce` takes).
    """

    teacher_payload: TeacherPayload
    metric_keys: tuple[str, ...]
    sum_keys: tuple[str, ...]

    def teacher_signals(self, teacher_logits: torch.Tensor, target_ids: torch.Tensor, *, group=None) -> TeacherSignals:
        """``[B, S, V_local]`` teacher logits + ``[B, S]`` targets -> per-token signals (no grad)."""
        ...

    def sampled_log_probs(self, logits: torch.Tensor, target_ids: torch.Tensor, *, group=None) -> torch.Tensor:
        """``[B, S]`` fp32 log-probs (nats) of ``target_ids`` under ``[B, S, V_local]`` logits, at the
        objective's temperature and true vocabulary (the old policy's log-probs)."""
        ...

    def loss(self, student_logits: torch.Tensor, teacher: TeacherSignals, old_log_probs: torch.Tensor,
             loss_mask: torch.Tensor, *, group=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss_sum, num_tokens, sums)`` of one micro-batch; ``sums`` are detached 0-dim tensors."""
        ...

    def reduce(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Summed metrics (over micro-batches and DP ranks) -> the reported means."""
        ...

    def for_iteration(self, teacher, micro_batches: Sequence, *, dp_group=None) -> "Objective":
        """The objective for one iteration, once the teacher has scored it and before the update (e.g. a
        threshold set from the whole global batch). ``teacher.for_micro_batch(mb)`` gives each
        micro-batch's signals. Collective over ``dp_group`` (the data-parallel group) when it needs one."""
        ...


class EOPDObjective:
    """Entropy-aware on-policy distillation (Jin et al. 2026, Eq. 7-10) and its exact full-vocabulary mode.

    Args:
        cfg: :class:`EOPDConfig` with ``vocab_size`` set to the tokenizer's true vocabulary.
    Attributes:
        cfg, teacher_payload (``"signals"`` for mode topk, ``"logits"`` for mode full), metric_keys, sum_keys.
    """

    def __init__(self, cfg: EOPDConfig):
        self.cfg = cfg
        self.teacher_payload: TeacherPayload = "signals" if cfg.mode == "topk" else "logits"
        self.metric_keys = METRIC_KEYS
        self.sum_keys = tuple(METRIC_DENOMINATORS)

    def teacher_signals(self, teacher_logits: torch.Tensor, target_ids: torch.Tensor, *, group=None) -> TeacherSignals:
        """See :func:`megatron_eaopd.loss.teacher_signals`; keeps the logits when the payload is ``"logits"``."""
        return teacher_signals(teacher_logits, target_ids, self.cfg, group=group,
                               keep_logits=self.teacher_payload == "logits")

    @torch.no_grad()
    def sampled_log_probs(self, logits: torch.Tensor, target_ids: torch.Tensor, *, group=None) -> torch.Tensor:
        """``log pi(y_t)`` of the sampled tokens, ``[B, S]`` fp32 nats (padded vocabulary rows masked)."""
        return vocab_parallel_log_probs(logits, target_ids.unsqueeze(-1), group=group, vocab_size=self.cfg.vocab_size,
                                        temperature=self.cfg.temperature)[..., 0].float()

    def loss(self, student_logits: torch.Tensor, teacher: TeacherSignals, old_log_probs: torch.Tensor,
             loss_mask: torch.Tensor, *, group=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`megatron_eaopd.loss.eopd_loss_sums`."""
        return eopd_loss_sums(student_logits, teacher, old_log_probs, loss_mask, self.cfg, group=group)

    def reduce(self, sums: Mapping[str, float]) -> dict[str, float]:
        """See :func:`megatron_eaopd.loss.reduce_metric_sums` (token means; ``fkl_gated`` over gated tokens;
        ``tau`` the threshold used; advantage variances)."""
        return reduce_metric_sums(sums, METRIC_DENOMINATORS)

    def for_iteration(self, teacher, micro_batches: Sequence, *, dp_group=None) -> "EOPDObjective":
        """The objective of one iteration: itself, or with ``tau_quantile`` set, a copy whose ``tau`` is the
        q-quantile of the teacher's entropy over every valid token of the global batch.

        Collective over ``dp_group`` when ``tau_quantile`` is set: each rank takes the entropies of its
        micro-batches' valid tokens (``teacher.for_micro_batch(mb).entropy[mb.loss_mask]``), the DP group
        gathers them all (:func:`~megatron_eaopd.loss.quantile.global_quantile`: exact, linear
        interpolation, float64) and every rank gets the same tau, computed before the update; so the
        loss does not depend on how the batch is split into micro-batches and DP ranks. TP peers hold
        the same entropies and reach the same tau over their own DP groups. With the ``"logits"``
        payload (mode full) each ``for_micro_batch`` runs the teacher's forward: the quantile costs one
        extra teacher forward per micro-batch. The reduced metrics report the tau used (``"tau"``).

        Args:
            teacher: the teacher phase's output (``for_micro_batch(mb) -> TeacherSignals``; a KeyError
                on the first micro-batch means this rank holds no signals, e.g. a pipeline stage before
                the last, which computes no loss: the objective is returned unchanged, no collective).
            micro_batches: this rank's micro-batches (``.loss_mask`` ``[mb, S]``).
            dp_group: the data-parallel group (None: the whole world when distributed, else this process).
        Returns:
            an :class:`EOPDObjective` (``tau`` unchanged when the global batch has no valid token).
        """
        q = self.cfg.tau_quantile
        if q is None:
            return self
        local = []
        for i, mb in enumerate(micro_batches):
            try:
                sig = teacher.for_micro_batch(mb)
            except KeyError:
                if i == 0:
                    return self  # no teacher signals on this rank (not the last pipeline stage)
                raise
            local.append(sig.entropy[mb.loss_mask.to(sig.entropy.device).bool()].detach().double().cpu())
        values = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64)
        tau = global_quantile(values, q, group=dp_group)
        if tau is None:
            return self
        return EOPDObjective(self.cfg.with_tau(max(tau, 0.0)))  # entropies are >= 0 (fp32 rounding aside)


#: Objective name -> class taking the loss configuration.
OBJECTIVES: dict[str, type] = {"eopd": EOPDObjective}


def build_objective(cfg: EOPDConfig, name: str = "eopd") -> Objective:
    """The objective ``name`` (see :data:`OBJECTIVES`) for the loss settings ``cfg``.

    Raises:
        ValueError: an unknown objective name (lists the registered ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](cfg)
