"""The loss's metrics: which sums it reports and how each turns into the logged value.

:func:`~megatron_eaopd.loss.eopd_loss_sums` returns SUMS (plus counts) per micro-batch, so the
numbers of a whole iteration are exact however it is split into micro-batches and data-parallel
ranks: add the sums key by key (the trainer all-reduces one dict), then :func:`reduce_metric_sums`
divides each by its count (:data:`METRIC_DENOMINATORS`) and computes the derived metrics
(:data:`DERIVED_METRICS`, e.g. a variance from the sums of A and A^2), once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

__all__ = ["METRIC_KEYS", "METRIC_DENOMINATORS", "DERIVED_METRICS", "reduce_metric_sums"]

#: The metrics :func:`~megatron_eaopd.loss.eopd_loss` reports (token means unless noted; nats for
#: entropies, KLs and log-ratios). Every iteration's log carries them.
METRIC_KEYS = (
    "rkl_term",  # mean l_rkl (topk: PPO-clipped sampled-token term; full: exact KL(student||teacher))
    "fkl_term",  # mean g_t * l_fkl over all valid tokens (before alpha)
    "gate_fraction",  # mean gate weight g_t (hard gates: fraction of valid tokens that pass)
    "teacher_entropy",  # mean full-vocabulary teacher entropy, nats
    "student_entropy",  # mean full-vocabulary student entropy, nats
    "teacher_high_entropy_fraction",  # fraction of valid tokens with teacher entropy > tau
    "student_high_entropy_fraction",  # fraction of valid tokens with student entropy > tau (paper: 18.5 % vs 6.8 %)
    "fkl_gated",  # mean l_fkl over gated tokens, weighted by g_t (0 if none); full mode: the exact KL(T||S)
    "log_ratio",  # mean log pi_theta(y_t) - log pi_old(y_t) (sampled token)
    "clip_fraction",  # fraction of valid tokens where the clipped branch is active (topk mode)
    "student_topk_mass",  # mean student probability mass on the teacher's top-k ids
    "teacher_student_log_ratio",  # mean log pi_T(y_t) - log pi_theta(y_t) (sampled-token RKL estimate, k1)
    "advantage",  # mean A_t = log pi_T(y_t) - log pi_old(y_t), the sampled-token advantage (no baseline)
    "advantage_var",  # variance of A_t over the valid tokens
    "advantage_var_baselined",  # variance of A_t + KL_t (the rkl_baseline="kl" advantage), whatever rkl_baseline is
    "baseline_kl",  # mean KL_t, the detached reverse KL of the baseline (topk: top-k + rest; full: exact)
    "tau",  # the entropy threshold in use, nats (the iteration's quantile with tau_quantile)
    "num_gated",  # sum of the gate weights over valid tokens (a count for hard gates)
)

#: What :func:`reduce_metric_sums` divides each summed quantity by: ``"num_tokens"`` (a token mean),
#: ``"num_gated"`` (a mean over gated tokens), ``"micro_batches"`` (a mean over loss calls) or None
#: (reported as the sum itself: a count).
METRIC_DENOMINATORS: dict[str, str | None] = {
    **{k: "num_tokens" for k in METRIC_KEYS if k not in ("advantage_var", "advantage_var_baselined")},
    "fkl_gated": "num_gated",
    "num_gated": None,
    "tau": "micro_batches",  # each call adds its tau once: the mean is the tau in use
    "advantage_sq": "num_tokens",  # mean A_t^2
    "advantage_baselined": "num_tokens",  # mean A_t + KL_t
    "advantage_baselined_sq": "num_tokens",  # mean (A_t + KL_t)^2
    "loss": "num_tokens",
    "num_tokens": None,
    "micro_batches": None,  # loss calls (micro-batches) summed
}


def _variance(mean_key: str, sq_key: str) -> Callable[[Mapping], float | torch.Tensor]:
    def var(means):
        v = means[sq_key] - means[mean_key] ** 2  # population variance E[x^2] - E[x]^2 (float64 sums)
        return v.clamp(min=0.0) if isinstance(v, torch.Tensor) else max(float(v), 0.0)
    return var


#: Metrics computed from the means of other sums (name -> function of the dict of means); they are not
#: sums themselves, so they have no denominator and are absent from the sums.
DERIVED_METRICS: dict[str, Callable[[Mapping], float | torch.Tensor]] = {
    "advantage_var": _variance("advantage", "advantage_sq"),
    "advantage_var_baselined": _variance("advantage_baselined", "advantage_baselined_sq"),
}


def _safe_mean(v, d):
    """``v / d``, or 0 when ``d`` <= 0; ``d`` may be a fractional weight sum (soft gates), never clamped to 1."""
    if isinstance(d, torch.Tensor):
        pos = d > 0
        return torch.where(pos, v / torch.where(pos, d, torch.ones_like(d)), torch.zeros_like(v / torch.ones_like(d)))
    return v / float(d) if float(d) > 0 else v * 0.0


def reduce_metric_sums(sums: Mapping[str, float | torch.Tensor],
                       denominators: Mapping[str, str | None] = METRIC_DENOMINATORS,
                       derived: Mapping[str, Callable] = DERIVED_METRICS) -> dict:
    """Turn summed metrics into the reported values: the one place that knows how each metric averages.

    Args:
        sums: metric name -> sum over any number of micro-batches / DP ranks (floats or 0-dim
            tensors), including the counts ``num_tokens``, ``num_gated`` and ``micro_batches`` (as
            :func:`~megatron_eaopd.loss.eopd_loss_sums` returns them, added key by key).
        denominators: metric -> the count it is divided by, or None to keep the sum (a count).
        derived: metric -> function of the means (computed when every mean it reads is present).
    Returns:
        ``{name: value}`` for every key of ``sums`` (means; counts as sums) plus the derived metrics
        (same type as the inputs); a mean over zero tokens is 0.
    Raises:
        KeyError: a metric without a denominator rule, or a denominator count missing from ``sums``.
    """
    out = {}
    for k, v in sums.items():
        den = denominators[k]
        if den is None:
            out[k] = v
        else:
            out[k] = _safe_mean(v, sums[den])
    for k, fn in derived.items():
        try:
            out[k] = fn(out)
        except KeyError:  # its inputs were not summed (e.g. a caller reducing a subset)
            continue
    return out
