"""Independent float64 reference for the objective variants (plain torch on FULL logits).

Written from docs/method.md ("Objectives beyond the paper") and the issue's definitions, sharing no code
with ``megatron_eaopd.loss``; the paper's pieces (log-softmax, entropy, exact KLs, the top-k forward-KL
term under each support) come from tests/loss_reference.py. The quantile is numpy's.
"""

from __future__ import annotations

import numpy as np
import torch

import loss_reference as ref


def gate_weights(h_t: torch.Tensor, tau: float, gate: str, sharpness: float) -> torch.Tensor:
    if gate == "hard":
        return (h_t > tau).double()
    if gate == "hard_ge":
        return (h_t >= tau).double()
    if gate == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-(h_t - tau) / sharpness))
    raise ValueError(gate)


def topk_rest_reverse_kl(lps: torch.Tensor, lpt: torch.Tensor, top_k: int) -> torch.Tensor:
    """KL(student || teacher) over the teacher's top-k ids plus one bucket for the rest, from probabilities."""
    tk_lp, tk_ids = lpt.topk(top_k, dim=-1)
    p = lps.gather(-1, tk_ids).exp()
    q = tk_lp.exp()
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - q.sum(-1)).clamp(min=1e-9)
    rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-300)) - torch.log(q_rest)),
                       torch.zeros_like(p_rest))
    return (p * (torch.log(p) - torch.log(q))).sum(-1) + rest


def quantile(h_t: torch.Tensor, mask: torch.Tensor, q: float) -> float:
    return float(np.quantile(h_t[mask.bool()].detach().numpy(), q))


def eopd_variant(student_logits, teacher_logits, target_ids, old_lp, mask, *, mode="topk", tau=0.8, alpha=1.0,
                 clip_eps=0.2, top_k=16, fkl_support="renormalize", temperature=1.0, vocab_size=None, gate="hard",
                 gate_sharpness=0.1, tau_quantile=None, rkl_baseline="none"):
    """Returns (loss_sum, num_tokens, parts): the per-token pieces and the expected metrics, float64."""
    lps = ref.masked_log_softmax(student_logits, vocab_size, temperature)
    lpt = ref.masked_log_softmax(teacher_logits, vocab_size, temperature)
    h_t = ref.entropy(teacher_logits, vocab_size, temperature)
    h_s = ref.entropy(student_logits.detach(), vocab_size, temperature)
    m = mask.double()
    if tau_quantile is not None:
        tau = max(quantile(h_t, mask, tau_quantile), 0.0)
    g = gate_weights(h_t, tau, gate, gate_sharpness)
    # the paper's forward-KL pieces (every token gated in the paper reference: tau = -1)
    _, _, _, paper = ref.eopd(student_logits, teacher_logits, target_ids, old_lp, mask, mode=mode, tau=-1.0,
                              alpha=alpha, clip_eps=clip_eps, top_k=top_k, fkl_support=fkl_support,
                              temperature=temperature, vocab_size=vocab_size)
    fkl = paper["fkl"]
    lp_y = lps.gather(-1, target_ids[..., None])[..., 0]
    lt_y = lpt.gather(-1, target_ids[..., None])[..., 0]
    adv_raw = (lt_y - old_lp.double()).detach()
    if mode == "topk":
        kl_b = topk_rest_reverse_kl(lps.detach(), lpt, top_k)
        adv = adv_raw + (kl_b if rkl_baseline == "kl" else 0.0)
        r = torch.exp(lp_y - old_lp.double())
        rkl = torch.maximum(-r * adv, -r.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    else:
        rkl = paper["rkl"]
        kl_b = rkl.detach()
    per_tok = (rkl + alpha * g * fkl) * m
    n = m.sum()
    v = mask.bool()
    a, ab = adv_raw[v], (adv_raw + kl_b)[v]
    metrics = {
        "tau": tau,
        "gate_fraction": float((g * m).sum() / n),
        "num_gated": float((g * m).sum()),
        "fkl_gated": float((g * fkl * m).sum() / (g * m).sum().clamp(min=1e-300)),
        "teacher_high_entropy_fraction": float(((h_t > tau).double() * m).sum() / n),
        "student_high_entropy_fraction": float(((h_s > tau).double() * m).sum() / n),
        "advantage": float(a.mean()),
        "advantage_var": float(a.var(unbiased=False)),
        "advantage_var_baselined": float(ab.var(unbiased=False)),
        "baseline_kl": float(kl_b[v].mean()),
        "rkl_term": float((rkl.detach() * m).sum() / n),
    }
    return per_tok.sum(), n, {"rkl": rkl, "fkl": fkl, "gate": g, "h_t": h_t, "kl_b": kl_b, "adv": adv_raw,
                              "metrics": metrics}
