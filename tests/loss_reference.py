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
            lq = torch.log_softmax(tk_lp, -1)
            fkl = (lq.exp() * (lq - s_k)).sum(-1)
        elif fkl_support == "raw":
            fkl = (tk_lp.exp() * (tk_lp - s_k)).sum(-1)
        else:
            q_rest = (1 - tk_lp.exp().sum(-1)).clamp(min=0)
            p_rest = (1 - s_k.exp().sum(-1)).clamp(min=1e-300)
            fkl = (tk_lp.exp() * (tk_lp - s_k)).sum(-1) + torch.where(
                q_rest > 0, q_rest * (torch.log(q_rest.clamp(min=1e-300)) - torch.log(p_rest)), torch.zeros_like(q_rest)
            )
    else:
        rkl = _kl_from_logprobs(lps, lpt)
        fkl = _kl_from_logprobs(lpt, lps)
    per_tok = (rkl + alpha * gate * fkl) * m
    return per_tok.sum(), m.sum(), per_tok, {"rkl": rkl, "fkl": fkl, "gate": gate, "h_t": h_t}


def shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s vocab shard of full logits ``[..., V]`` (V divisible by world)."""
    v = full.shape[-1]
    assert v % world == 0
    n = v // world
    return full[..., rank * n:(rank + 1) * n]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|), in float64; 0 for empty tensors."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


__all__ = ["masked_log_softmax", "entropy", "log_probs", "lse", "kl", "eopd", "shard", "rel_err", "is_finite", "math"]
