"""Independent float64 single-process reference for the EOPD loss (plain torch on FULL logits).

Written straight from docs/method.md, sharing no code with ``megatron_eaopd.loss``. Everything takes the
gathered full-vocabulary logits ``[..., V]`` and returns float64.
"""

from __future__ import annotations

import math

import torch


def masked_log_softmax(logits: torch.Tensor, vocab_size: int | None = None, temperature: float = 1.0):
    """log_softmax over the true vocabulary; padded columns (>= vocab_size) are -inf with zero gradient."""
    z = logits.double() / temperature
    v = z.shape[-1] if vocab_size is None else vocab_size
    lp = torch.log_softmax(z[..., :v], dim=-1)
    if v < z.shape[-1]:
        pad = torch.full((*z.shape[:-1], z.shape[-1] - v), float("-inf"), dtype=lp.dtype)
        lp = torch.cat([lp, pad], dim=-1)
    return lp


def _plogp(lp):
    """p * log p with 0 where p = 0, gradient-safe for -inf entries."""
    finite = torch.isfinite(lp)
    safe = torch.where(finite, lp, torch.zeros_like(lp))
    return torch.where(finite, safe.exp() * safe, torch.zeros_like(lp))


def entropy(logits, vocab_size=None, temperature=1.0):
    return -_plogp(masked_log_softmax(logits, vocab_size, temperature)).sum(-1)


def log_probs(logits, ids, vocab_size=None, temperature=1.0):
    return masked_log_softmax(logits, vocab_size, temperature).gather(-1, ids)


def lse(logits, vocab_size=None, temperature=1.0):
    z = logits.double() / temperature
    if vocab_size is not None and vocab_size < z.shape[-1]:
        z = z[..., :vocab_size]
    return torch.logsumexp(z, dim=-1)


def _kl_from_logprobs(lp, lq):
    finite = torch.isfinite(lp)
    sp = torch.where(finite, lp, torch.zeros_like(lp))
    sq = torch.where(finite, lq, torch.zeros_like(lq))
    return torch.where(finite, sp.exp() * (sp - sq), torch.zeros_like(lp)).sum(-1)


def kl(p_logits, q_logits, vocab_size=None, temperature=1.0):
    return _kl_from_logprobs(masked_log_softmax(p_logits, vocab_size, temperature),
                             masked_log_softmax(q_logits, vocab_size, temperature))


def eopd(student_logits, teacher_logits, target_ids, old_lp, mask, *, mode="topk", tau=0.8, alpha=1.0,
         clip_eps=0.2, top_k=16, fkl_support="renormalize", temperature=1.0, vocab_size=None):
    """Returns (loss_sum, num_tokens, per_token l_t, dict of per-token pieces), all float64."""
    lps = masked_log_softmax(student_logits, vocab_size, temperature)
    lpt = masked_log_softmax(teacher_logits, vocab_size, temperature)
    h_t = -_plogp(lpt).sum(-1)
    gate = (h_t > tau).double()
    m = mask.double()
    if mode == "topk":
        lp_y = lps.gather(-1, target_ids[..., None])[..., 0]
        lt_y = lpt.gather(-1, target_ids[..., None])[..., 0]
        adv = (lt_y - old_lp.double()).detach()
        r = torch.exp(lp_y - old_lp.double())
        rkl = torch.maximum(-r * adv, -r.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        tk_lp, tk_ids = lpt.topk(top_k, dim=-1)
        s_k = lps.gather(-1, tk_ids)
        if fkl_support == "renormalize":
            fkl = _kl_from_logprobs(torch.log_softmax(tk_lp, -1), s_k)
        elif fkl_support == "raw":
            fkl = _kl_from_logprobs(tk_lp, s_k)
        else:
            # teacher top-k slots with zero probability (fewer than k finite logits) join the rest bucket
            s_k = torch.where(torch.isfinite(tk_lp), s_k, torch.full_like(s_k, float("-inf")))
            q_rest = (1 - tk_lp.exp().sum(-1)).clamp(min=0)
            p_rest = (1 - s_k.exp().sum(-1)).clamp(min=1e-300)
            fkl = _kl_from_logprobs(tk_lp, s_k) + torch.where(
                q_rest > 0, q_rest * (torch.log(q_rest.clamp(min=1e-300)) - torch.log(p_rest)), torch.zeros_like(q_rest)
            )
    else:
        rkl = _kl_from_logprobs(lps, lpt)
        fkl = _kl_from_logprobs(lpt, lps)
    per_tok = (rkl + alpha * gate * fkl) * m
    return per_tok.sum(), m.sum(), per_tok, {"rkl": rkl, "fkl": fkl, "gate": gate, "h_t": h_t}


#: Every metric ``eopd_loss`` reports, listed here independently of the product's ``METRIC_KEYS``.
METRICS = ("rkl_term", "fkl_term", "gate_fraction", "teacher_entropy", "student_entropy", "fkl_gated",
           "log_ratio", "clip_fraction", "student_topk_mass", "teacher_student_log_ratio", "num_gated",
           "teacher_high_entropy_fraction", "student_high_entropy_fraction", "advantage", "advantage_var",
           "advantage_var_baselined", "baseline_kl", "tau")


def eopd_metrics(student_logits, teacher_logits, target_ids, old_lp, mask, *, mode="topk", tau=0.8, alpha=1.0,
                 clip_eps=0.2, top_k=16, fkl_support="renormalize", temperature=1.0, vocab_size=None):
    """Every metric of :data:`METRICS` as a float64 0-dim tensor, from the definitions in docs/method.md.

    Token means over the valid (mask = 1) tokens, 0 when there are none; ``fkl_gated`` is the mean over
    the gated valid tokens; ``num_gated`` a count. ``clip_fraction`` counts the tokens where the PPO
    clip binds (it is what the clipped surrogate's max picks): ratio above 1 + eps with a positive
    advantage, or below 1 - eps with a negative one (always 0 in ``mode="full"``, which has no clip).
    """
    _, _, _, parts = eopd(student_logits, teacher_logits, target_ids, old_lp, mask, mode=mode, tau=tau, alpha=alpha,
                          clip_eps=clip_eps, top_k=top_k, fkl_support=fkl_support, temperature=temperature,
                          vocab_size=vocab_size)
    lps = masked_log_softmax(student_logits, vocab_size, temperature)
    lpt = masked_log_softmax(teacher_logits, vocab_size, temperature)
    valid = mask.double() > 0
    n = max(int(valid.sum()), 1)
    lp_y = lps.gather(-1, target_ids[..., None])[..., 0]  # log pi_theta(y_t)
    lt_y = lpt.gather(-1, target_ids[..., None])[..., 0]  # log pi_T(y_t)
    old = old_lp.double()
    ratio, adv = torch.exp(lp_y - old), lt_y - old
    if mode == "topk":
        binds = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    else:
        binds = torch.zeros_like(valid)
    gated = (parts["h_t"] > tau) & valid
    topk_lp, topk_ids = lpt.topk(top_k, dim=-1)
    in_topk = torch.isfinite(topk_lp)  # a teacher with fewer than k finite logits has fewer than k entries

    def mean(x):
        return torch.where(valid, x.double(), torch.zeros((), dtype=torch.float64)).sum() / n

    h_s = entropy(student_logits, vocab_size, temperature)
    if mode == "topk":  # KL(student || teacher) over the teacher's top-k plus one bucket for the rest; the
        # teacher's rest mass (a denominator) floored at 1e-9, the documented convention that keeps it finite
        p, q = lps.gather(-1, topk_ids).exp(), topk_lp.exp()
        p_rest = (1.0 - torch.where(in_topk, p, 0.0).sum(-1)).clamp(min=0.0)
        q_rest = (1.0 - torch.where(in_topk, q, 0.0).sum(-1)).clamp(min=1e-9)
        kl_b = torch.where(in_topk, p * (torch.log(p) - torch.where(in_topk, topk_lp, 0.0)), 0.0).sum(-1) + torch.where(
            p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-300)) - torch.log(q_rest)), 0.0)
    else:  # the exact full-vocabulary KL
        kl_b = parts["rkl"]
    a, ab = adv[valid], (adv + kl_b)[valid]

    return {
        "rkl_term": mean(parts["rkl"]),
        "fkl_term": mean(torch.where(gated, parts["fkl"], torch.zeros((), dtype=torch.float64))),
        "gate_fraction": mean(gated),
        "teacher_entropy": mean(parts["h_t"]),
        "student_entropy": mean(entropy(student_logits, vocab_size, temperature)),
        "fkl_gated": parts["fkl"][gated].sum() / max(int(gated.sum()), 1),
        "log_ratio": mean(lp_y - old),
        "clip_fraction": mean(binds),
        "student_topk_mass": mean(torch.where(in_topk, lps.gather(-1, topk_ids).exp(), torch.zeros((), dtype=torch.float64)).sum(-1)),
        "teacher_student_log_ratio": mean(lt_y - lp_y),
        "num_gated": gated.sum().double(),
        "teacher_high_entropy_fraction": mean(parts["h_t"] > tau),
        "student_high_entropy_fraction": mean(h_s > tau),
        "advantage": a.mean() if a.numel() else torch.zeros((), dtype=torch.float64),
        "advantage_var": a.var(unbiased=False) if a.numel() else torch.zeros((), dtype=torch.float64),
        "advantage_var_baselined": ab.var(unbiased=False) if ab.numel() else torch.zeros((), dtype=torch.float64),
        "baseline_kl": mean(kl_b),
        "tau": torch.tensor(float(tau), dtype=torch.float64),
    }


def with_ratios(student_logits, teacher_logits, target_ids, ratio, adv, vocab_size=None):
    """Student logits and old log-probs that give PPO ratios ``ratio`` and advantages ``adv`` (T = 1).

    Only the student's logit at each target changes: it is solved so that ``log pi_theta(y_t) =
    log pi_T(y_t) - adv + log ratio``; then ``old = log pi_T(y_t) - adv``. So ``exp(log pi_theta(y) -
    old) = ratio`` and ``log pi_T(y) - old = adv`` exactly in float64. Returns ``(student, old)`` float64.
    Raises AssertionError when a requested log-prob would not be below 0 (pick a less likely target).
    """
    lt_y = log_probs(teacher_logits, target_ids[..., None], vocab_size)[..., 0]
    old = lt_y - adv.double()
    want = old + torch.log(ratio.double())
    assert bool((want < -0.05).all()), f"targets too likely for the requested ratios: max log-prob {float(want.max())}"
    z = student_logits.double().clone()
    v = z.shape[-1] if vocab_size is None else vocab_size
    rest = z[..., :v].scatter(-1, target_ids[..., None], float("-inf"))
    lse_rest = torch.logsumexp(rest, dim=-1)
    # softmax at y equals p = e^want:  z_y = lse_rest + log p - log(1 - p)
    z_y = lse_rest + want - torch.log(-torch.expm1(want))
    z.scatter_(-1, target_ids[..., None], z_y[..., None])
    return z, old


def clip_margin(student_logits, target_ids, old_lp, clip_eps=0.2, vocab_size=None, temperature=1.0):
    """Smallest distance of a PPO ratio to the clip boundaries 1 +- eps (float64, from these exact inputs)."""
    lp_y = log_probs(student_logits, target_ids[..., None], vocab_size, temperature)[..., 0]
    r = torch.exp(lp_y - old_lp.double())
    return float(torch.minimum((r - 1 - clip_eps).abs(), (r - 1 + clip_eps).abs()).min())


def shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s vocab shard of full logits ``[..., V]`` (V divisible by world)."""
    v = full.shape[-1]
    assert v % world == 0
    n = v // world
    return full[..., rank * n:(rank + 1) * n]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b| over finite b), in float64; 0 for empty tensors.

    Equal entries (including equal infinities, e.g. log-probs of zero-probability ids) count as exact; an
    infinity against a finite value is an infinite error, a NaN on either side a NaN error (fails <=)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    d = torch.where(a == b, torch.zeros((), dtype=torch.float64), (a - b).abs())
    finite = b[torch.isfinite(b)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return float(d.max() / scale)


def sum_err(a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor) -> float:
    """|a - b| for a sum ``b`` of ``terms``, relative to max(1, sum |terms|): the scale of the rounding error
    of a sum whose terms cancel (PPO terms with advantages of both signs)."""
    return float((a.detach().double() - b.detach().double()).abs() / max(1.0, float(terms.detach().abs().sum())))


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


__all__ = ["masked_log_softmax", "entropy", "log_probs", "lse", "kl", "eopd", "METRICS", "eopd_metrics", "with_ratios",
           "clip_margin", "shard", "rel_err", "sum_err", "is_finite", "math"]
