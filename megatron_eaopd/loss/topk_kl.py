"""KL divergences on the teacher's top-k ids, from log-probs gathered there (float64, per token).

Inputs are ``[N, k]`` log-probs at the teacher's top-k ids K_t, both normalised over the FULL
vocabulary: the teacher's ``t_lp`` (from :func:`~megatron_eaopd.loss.teacher_signals`) and the
student's ``s_lp``. Outputs are ``[N]`` float64 (nats).

* :func:`topk_forward_kl`: the paper's forward-KL term (Eq. 10) under the three supports
  ``renormalize`` / ``raw`` / ``tail`` (docs/method.md, "The forward-KL support");
* :func:`topk_reverse_kl`: KL(student || teacher) over K_t plus one rest bucket, the top-k estimate of
  the per-token reverse KL that ``rkl_baseline="kl"`` subtracts from the sampled-token advantage.

"Rest bucket": the k + 1 outcomes {each id of K_t, everything else}; each distribution puts
``1 - sum_{K_t} p`` on the last one. A KL between two distributions on these k + 1 outcomes is a true
divergence (>= 0, zero iff they agree on K_t and on the rest) and, by the data-processing
inequality, a lower bound of the full-vocabulary KL. Top-k slots with zero teacher probability
(``-inf``: fewer finite logits than k) belong to the rest.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TAIL_FLOOR", "topk_forward_kl", "topk_reverse_kl", "log1mexp"]

#: Smallest rest-of-vocabulary mass used for a distribution whose rest is a denominator (fp32 log-prob
#: resolution: below it, ``1 - sum p`` is rounding noise of the log-probs).
TAIL_FLOOR = 1e-9


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (larger x is clamped to 0, giving -inf), stable on both sides of
    ``-log 2`` (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _buckets(t: torch.Tensor, s: torch.Tensor, t_rest: torch.Tensor | None):
    """The k + 1 buckets: ``(lq, lp, keep)``, each ``[N, k + 1]`` (teacher log-probs with 0 at dropped
    slots, student log-probs with 0 at dropped slots, and which slots exist; the rest bucket always
    does). The teacher's rest is ``t_rest`` when given, else ``log(1 - sum)`` of its top-k, like the
    student's; nothing is floored here."""
    valid = torch.isfinite(t)
    s_in = torch.where(valid, s, float("-inf"))
    if t_rest is not None:
        lq_rest = t_rest.double().reshape(-1, 1)
    else:
        lq_rest = log1mexp(torch.logsumexp(t, dim=-1, keepdim=True))
    lp_rest = log1mexp(torch.logsumexp(s_in, dim=-1, keepdim=True))
    lq = torch.cat([torch.where(valid, t, 0.0), lq_rest], dim=-1)
    lp = torch.cat([torch.where(valid, s, 0.0), lp_rest], dim=-1)
    keep = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    return lq, lp, keep


def topk_forward_kl(t_lp: torch.Tensor, s_lp: torch.Tensor, support: str,
                    t_rest: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL of the teacher against the student on the teacher's top-k (paper Eq. 10).

    Args:
        t_lp: ``[N, k]`` teacher log-probs at K_t (full-vocab normalised; ``-inf`` allowed).
        s_lp: ``[N, k]`` student full-vocab log-probs at K_t (differentiable).
        support: ``renormalize`` (q = teacher softmax over K_t) | ``raw`` (q = teacher probabilities) |
            ``tail`` (K_t plus the rest bucket on both sides).
        t_rest: optional ``[N]`` log of the teacher's mass outside K_t (``TeacherSignals.rest_log_prob``;
            ``tail`` only); None derives it from ``t_lp``.
    Returns:
        ``[N]`` float64 l_fkl, differentiable w.r.t. ``s_lp``. ``tail`` is computed as
        ``sum_i q_i (e^d_i - 1 - d_i)`` with ``d_i = log p_i - log q_i`` over the k + 1 buckets, each
        term >= 0 in floating point, so it is never negative (a truncated sum can go negative and gets
        clamped elsewhere, which kills its gradient: verl-project/verl#7856). The student's rest mass is
        floored at :data:`TAIL_FLOOR`.
    """
    t = t_lp.double()
    s = s_lp.double()
    if support in ("renormalize", "raw"):
        lq = torch.log_softmax(t, dim=-1) if support == "renormalize" else t
        finite = torch.isfinite(lq)  # -inf teacher entries have q = 0 and contribute exactly 0 (no 0 * inf)
        return torch.where(finite, lq.exp() * (torch.where(finite, lq, 0.0) - s), 0.0).sum(-1)
    if support != "tail":
        raise ValueError(f"fkl_support must be 'renormalize', 'raw' or 'tail', got {support!r}")
    lq, lp, keep = _buckets(t, s, t_rest)
    last = torch.zeros_like(keep)
    last[:, -1] = True
    lp = torch.where(last, lp.clamp(min=math.log(TAIL_FLOOR)), lp)
    q_pos = keep & torch.isfinite(lq)
    d = torch.where(q_pos, lp - lq, 0.0)
    # each term >= 0: q (e^d - 1 - d) where q > 0; where q = 0 (only the rest bucket) the KL charges p
    term = torch.where(q_pos, lq.exp() * (torch.expm1(d) - d), torch.where(keep, lp.exp(), 0.0))
    return term.sum(-1)


@torch.no_grad()
def topk_reverse_kl(t_lp: torch.Tensor, s_lp: torch.Tensor, t_rest: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(student || teacher)`` over the teacher's top-k ids plus the rest bucket (no gradient).

    The top-k estimate of the per-token reverse KL that ``EOPDConfig.rkl_baseline="kl"`` adds back to
    the sampled-token advantage (vOPD, arXiv 2605.07865: the advantage ``log pi_T(y) - log pi_S(y)``
    has expectation ``-KL(pi_S || pi_T)`` under the student's sampling).

    Args:
        t_lp: ``[N, k]`` teacher log-probs at K_t (full-vocab normalised; ``-inf`` allowed).
        s_lp: ``[N, k]`` student full-vocab log-probs at K_t.
        t_rest: optional ``[N]`` log of the teacher's mass outside K_t (``TeacherSignals.rest_log_prob``:
            exact where the top-k holds nearly all the mass, where ``log(1 - sum exp(t_lp))`` in fp32 is
            not); None derives it from ``t_lp``.
    Returns:
        ``[N]`` float64, ``sum_b p_b (log p_b - log q_b)`` over the k + 1 buckets (p student, q
        teacher; ``0 log 0 = 0``); finite: the teacher's rest mass, a denominator here, is floored at
        :data:`TAIL_FLOOR`. At most the full-vocabulary KL (data processing); equal to it when K_t
        holds every id the two distributions give mass to.
    """
    lq, lp, keep = _buckets(t_lp.double(), s_lp.double(), t_rest)
    lq = torch.cat([lq[:, :-1], lq[:, -1:].clamp(min=math.log(TAIL_FLOOR))], dim=-1)
    p_pos = keep & torch.isfinite(lp)
    return torch.where(p_pos, lp.exp() * (torch.where(p_pos, lp, 0.0) - lq), 0.0).sum(-1)
