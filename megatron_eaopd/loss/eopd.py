"""The EOPD objective (Jin et al., arXiv 2603.07079, Eq. 7-10) on vocab-parallel logits, and its variants.

Per response token t (docs/method.md, "The objective"):

* reverse-KL term, PPO-clipped sampled-token estimator (Eq. 7-8)::

      A_t = stopgrad(log pi_T(y_t) - log pi_old(y_t) [+ KL_t with rkl_baseline="kl"])
      r_t = exp(log pi_theta(y_t) - log pi_old(y_t));  l_rkl = max(-r_t A_t, -clip(r_t, 1 - eps, 1 + eps) A_t)

  where KL_t is the detached ``KL(pi_theta || pi_T)(s_t)`` over the teacher's top-k plus a rest bucket
  (vOPD's control variate: A_t has expectation -KL under the student's sampling; a baseline that does
  not depend on y_t leaves the expected gradient unchanged);
* forward-KL term over the teacher's top-k K_t (Eq. 10), against the student's FULL-vocabulary
  log-softmax at K_t; ``fkl_support`` picks the teacher distribution q_t on K_t
  (:func:`~megatron_eaopd.loss.topk_kl.topk_forward_kl`);
* per-token loss (Eq. 9): ``l_t = l_rkl + alpha * g_t * l_fkl`` with the gate ``g_t`` of
  :data:`~megatron_eaopd.loss.gates.GATES` (paper: ``1[H_T(t) > tau]``).

``mode="full"`` is this project's exact extension: ``l_t = KL(pi_theta||pi_T) + alpha * g_t *
KL(pi_T||pi_theta)`` over the whole vocabulary with analytic gradients (teacher logits needed on the
student's vocab shards). Its reverse-KL gradient ``p (log p - log q - KL)`` is the expectation of the
baselined sampled-token estimator, so ``rkl_baseline`` leaves it unchanged. ``alpha = 0`` is plain OPD.

:func:`eopd_loss` follows Megatron's per-token-loss convention: it returns the SUM of per-token losses
over the loss mask and the number of tokens, so the global token mean (docs/method.md, step 4) is exact
however the global batch is split into micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import torch

from megatron_eaopd.loss.config import EOPDConfig
from megatron_eaopd.loss.gates import GATES
from megatron_eaopd.loss.metrics import METRIC_DENOMINATORS, METRIC_KEYS, reduce_metric_sums
from megatron_eaopd.loss.signals import TeacherSignals, teacher_signals
from megatron_eaopd.loss.topk_kl import topk_forward_kl, topk_reverse_kl
from megatron_eaopd.loss.vocab_parallel import vocab_parallel_kl_pair, vocab_parallel_log_probs_and_entropy

# EOPDConfig, TeacherSignals, teacher_signals and the metric tables live in their own modules; they are
# re-exported here for code that imported them from megatron_eaopd.loss.eopd.
__all__ = ["eopd_loss", "eopd_loss_sums", "EOPDConfig", "TeacherSignals", "teacher_signals", "reduce_metric_sums",
           "METRIC_KEYS", "METRIC_DENOMINATORS"]



def _masked_sum(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_t m_t x_t`` as a detached 0-dim float64 tensor (x is already 0 at invalid positions)."""
    return (x.detach().double() * m).sum()


def eopd_loss_sums(
    student_logits: torch.Tensor, sig: TeacherSignals, old_log_probs: torch.Tensor, loss_mask: torch.Tensor,
    cfg: EOPDConfig, *, group=None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """EOPD loss (Eq. 9) of one micro-batch, with its metrics as sums (for exact aggregation).

    Args: as :func:`eopd_loss`.
    Returns:
        ``(loss_sum, num_tokens, sums)``: ``loss_sum`` and ``num_tokens`` as in :func:`eopd_loss`;
        ``sums`` maps every key of :data:`METRIC_DENOMINATORS` to a detached 0-dim float64 tensor: the
        sum over this call's valid tokens (weighted by the gate for ``fkl_gated``; counts for
        ``num_gated`` / ``num_tokens``; ``tau`` and ``micro_batches`` once per call). Add them over
        micro-batches and DP ranks, then :func:`reduce_metric_sums` gives the global values.
    Raises: as :func:`eopd_loss`.
    Source: Jin et al. 2026, Eq. 7-10; docs/method.md "The objective", "Exact full-vocabulary mode" and
    "Objectives beyond the paper" (vOPD baseline, arXiv 2605.07865).
    """
    if not isinstance(cfg, EOPDConfig):
        raise ValueError(f"cfg must be an EOPDConfig, got {type(cfg).__name__}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, S, V_local], got shape {tuple(student_logits.shape)}")
    bs = tuple(student_logits.shape[:2])
    for name, t in (("old_log_probs", old_log_probs), ("loss_mask", loss_mask), ("sig.target_ids", sig.target_ids),
                    ("sig.target_log_probs", sig.target_log_probs), ("sig.entropy", sig.entropy),
                    ("sig.rest_log_prob", sig.rest_log_prob)):
        if t is not None and tuple(t.shape) != bs:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, S] = {bs} like student_logits")
    k = sig.topk_ids.shape[-1]
    if tuple(sig.topk_ids.shape) != (*bs, k) or tuple(sig.topk_log_probs.shape) != (*bs, k):
        raise ValueError(
            f"sig.topk_ids {tuple(sig.topk_ids.shape)} / sig.topk_log_probs {tuple(sig.topk_log_probs.shape)} "
            f"must be [B, S, k] with [B, S] = {bs}"
        )
    if k != cfg.top_k:
        raise ValueError(f"sig carries top-{k} teacher ids but EOPDConfig.top_k={cfg.top_k}; recompute teacher_signals")
    mask = loss_mask.to(torch.float32)
    valid = mask > 0
    _check_finite("old_log_probs", old_log_probs, valid, allow_inf=False)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("loss_mask must hold 0/1 values (bool or float); weighted masks would break the token mean")
    _check_finite("sig.target_log_probs", sig.target_log_probs, valid)
    _check_finite("sig.entropy", sig.entropy, valid)
    _check_finite("sig.topk_log_probs", sig.topk_log_probs, valid.unsqueeze(-1))
    if sig.rest_log_prob is not None:
        _check_finite("sig.rest_log_prob", sig.rest_log_prob, valid)

    ids = torch.cat([sig.target_ids.unsqueeze(-1).long(), sig.topk_ids.long()], dim=-1)  # [B, S, 1 + k]
    kw = dict(group=group, vocab_size=cfg.vocab_size, temperature=cfg.temperature, chunk_size=chunk_size)
    zero = torch.zeros((), device=mask.device)
    # masked positions get neutral values so that no inf/NaN enters the graph (0 * inf = NaN in backward)
    old = torch.where(valid, old_log_probs.float(), zero)
    t_lp_target = torch.where(valid, sig.target_log_probs.float(), zero)
    t_ent = torch.where(valid, sig.entropy.float(), zero)
    gate = torch.where(valid, GATES[cfg.gate](t_ent, cfg), zero)
    t_topk = torch.where(valid.unsqueeze(-1), sig.topk_log_probs.float(), zero)
    t_rest = None if sig.rest_log_prob is None else \
        torch.where(valid, sig.rest_log_prob.float(), float("-inf")).reshape(-1)  # masked: no rest, like t_topk = 0

    if cfg.mode == "topk":
        s_lp, s_ent = vocab_parallel_log_probs_and_entropy(student_logits, ids, **kw)
        lp = torch.where(valid, s_lp[..., 0], zero)
        s_topk = torch.where(valid.unsqueeze(-1), s_lp[..., 1:], zero)
        # the baseline's reverse KL, KL(pi_theta || pi_T) on K_t + rest: a function of s_t only (not of y_t)
        kl_base = topk_reverse_kl(t_topk.reshape(-1, k), s_topk.detach().reshape(-1, k), t_rest).view(bs).float()
        kl_base = torch.where(valid, kl_base, zero)
        adv = (t_lp_target - old + (kl_base if cfg.rkl_baseline == "kl" else 0.0)).detach()
        ratio = torch.exp(lp - old)
        unclipped = -ratio * adv
        clipped = -ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
        l_rkl = torch.maximum(unclipped, clipped)
        clip_frac_tok = (clipped > unclipped).float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.alpha > 0):
            l_fkl = topk_forward_kl(t_topk.reshape(-1, k), s_topk.reshape(-1, k), cfg.fkl_support,
                                    t_rest).view(bs).float()
        s_lp_ids = s_lp.detach()
    else:
        if sig.logits is None:
            raise ValueError(
                "EOPDConfig.mode='full' needs the teacher logits on the student's vocab shards: compute the "
                "signals with teacher_signals(..., keep_logits=True) from a teacher in the student's TP layout"
            )
        if sig.logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(sig.logits.shape)} and student logits {tuple(student_logits.shape)} must "
                f"have the same shape (same micro-batch, same vocab shards)"
            )
        # exact reverse KL: its gradient is already the expectation of the baselined estimator (rkl_baseline moot)
        l_rkl, l_fkl, s_ent, s_lp_ids = vocab_parallel_kl_pair(student_logits, sig.logits.detach(), ids, **kw)
        lp = torch.where(valid, s_lp_ids[..., 0], zero)
        kl_base = torch.where(valid, l_rkl.detach(), zero)
        clip_frac_tok = torch.zeros_like(mask)

    # the forward-KL part only where its weight is non-zero: an infinite KL (a student -inf logit at a teacher
    # top-k id) on an ungated token, or with alpha = 0, must not turn 0 * inf into NaN
    fkl_part = torch.where(gate > 0, gate * l_fkl, zero)
    per_token = l_rkl + (cfg.alpha * fkl_part if cfg.alpha > 0 else zero)
    per_token = torch.where(valid, per_token, zero)
    loss_sum = (per_token * mask).sum()
    num_tokens = valid.sum()
    with torch.no_grad():
        s_ent = torch.where(valid, s_ent.detach(), zero)
        a = (t_lp_target - old).double() * mask  # the sampled-token advantage, no baseline
        ab = a + kl_base.double() * mask  # with the baseline
        sums = {
            "rkl_term": _masked_sum(l_rkl, mask),
            "fkl_term": _masked_sum(fkl_part, mask),
            "gate_fraction": _masked_sum(gate, mask),
            "teacher_entropy": _masked_sum(t_ent, mask),
            "student_entropy": _masked_sum(s_ent, mask),
            "teacher_high_entropy_fraction": _masked_sum((t_ent > cfg.tau).float(), mask),
            "student_high_entropy_fraction": _masked_sum((s_ent > cfg.tau).float(), mask),
            "fkl_gated": _masked_sum(torch.where(valid, fkl_part.detach(), zero), mask),
            "log_ratio": _masked_sum(lp - old, mask),
            "clip_fraction": _masked_sum(clip_frac_tok, mask),
            # empty top-k slots (a teacher with fewer than k finite logits: -inf, id 0) hold no mass
            "student_topk_mass": _masked_sum(torch.where(
                valid, torch.where(torch.isfinite(sig.topk_log_probs), s_lp_ids[..., 1:].exp(), 0.0).sum(-1), zero), mask),
            "teacher_student_log_ratio": _masked_sum(t_lp_target - lp, mask),
            "advantage": a.sum(),
            "advantage_sq": (a * a).sum(),
            "advantage_baselined": ab.sum(),
            "advantage_baselined_sq": (ab * ab).sum(),
            "baseline_kl": _masked_sum(kl_base, mask),
            "tau": torch.tensor(float(cfg.tau), dtype=torch.float64, device=mask.device),
            "num_gated": _masked_sum(gate, mask),
            "loss": loss_sum.detach().double(),
            "num_tokens": num_tokens.double(),
            "micro_batches": torch.ones((), dtype=torch.float64, device=mask.device),
        }
    return loss_sum, num_tokens, sums


def eopd_loss(
    student_logits: torch.Tensor, sig: TeacherSignals, old_log_probs: torch.Tensor, loss_mask: torch.Tensor,
    cfg: EOPDConfig, *, group=None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """EOPD loss (Eq. 9) of one micro-batch, in Megatron's per-token-loss convention.

    Args:
        student_logits: ``[B, S, V_local]`` vocab-parallel student logits (requires grad; any float dtype).
        sig: :class:`TeacherSignals` for the same ``[B, S]`` rows (``sig.logits`` needed for mode="full").
        old_log_probs: ``[B, S]`` fp32 ``log pi_old(y_t)`` of the rollout policy (recomputed by the trainer).
        loss_mask: ``[B, S]`` 0/1 (bool or float): response tokens that count.
        cfg: :class:`EOPDConfig`.
        group: tensor-parallel group (default: Megatron's).
    Returns:
        ``(loss_sum, num_tokens, metrics)``: ``loss_sum`` is a 0-dim fp32 tensor
        ``sum_t m_t l_t`` (nats; differentiable w.r.t. ``student_logits``), ``num_tokens`` the 0-dim
        int64 count ``sum_t m_t``; divide the sum over all micro-batches and DP ranks by the total
        token count for the paper's token mean (docs/method.md, step 4). ``metrics`` maps each of
        :data:`METRIC_KEYS` to a detached 0-dim float64 tensor: token means over this call's valid
        tokens (0 when there are none), except ``num_gated`` (a count), ``tau`` and the variances. To
        aggregate several calls exactly, use :func:`eopd_loss_sums` and :func:`reduce_metric_sums`.
    Raises:
        ValueError: mismatched shapes or vocab shards, unknown options, k > vocabulary, NaN in the inputs
        (the message names the tensor and the position), a TP group that does not divide the vocabulary.
    Source: Jin et al. 2026, Eq. 7-10; docs/method.md "The objective" and "Exact full-vocabulary mode".
    """
    loss_sum, num_tokens, sums = eopd_loss_sums(student_logits, sig, old_log_probs, loss_mask, cfg, group=group,
                                                chunk_size=chunk_size)
    means = reduce_metric_sums(sums)
    return loss_sum, num_tokens, {k: means[k] for k in METRIC_KEYS}


def _check_finite(name: str, t: torch.Tensor, valid: torch.Tensor, allow_inf: bool = True) -> None:
    """Raise if ``t`` holds NaN (or, with ``allow_inf=False``, +-inf) where ``valid`` (broadcast) is true.

    -inf log-probs are allowed by default (zero probability)."""
    bad = (torch.isnan(t) if allow_inf else ~torch.isfinite(t)) & valid
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        what = "NaN" if allow_inf else "NaN or inf"
        raise ValueError(f"{name} contains {what} at a valid (loss_mask=1) position {idx} ({int(bad.sum())} in total)")
