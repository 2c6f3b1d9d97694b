"""Entropy gates: which tokens get the forward-KL term, and with what weight.

A gate maps the teacher's full-vocabulary entropy ``H_T`` (nats, ``[B, S]`` fp32) and the loss
settings to per-token weights ``g_t`` in [0, 1] (``[B, S]`` fp32, no gradient); the per-token loss is
``l_rkl + alpha * g_t * l_fkl`` (paper Eq. 9). Each gate is one function in :data:`GATES`; the
``gate`` field of :class:`megatron_eaopd.loss.EOPDConfig` names it, so a new gate is one function
here (plus any setting it reads, as a field of ``EOPDConfig``).

* ``"hard"`` (default): ``1[H_T > tau]``, Eq. 9 as the paper writes it;
* ``"hard_ge"``: ``1[H_T >= tau]``, what the authors' public code computes (only exact ties differ);
* ``"sigmoid"``: ``sigmoid((H_T - tau) / s)`` with ``s = gate_sharpness`` nats: tokens just below tau
  keep some forward-KL weight and tokens just above do not get all of it, so the loss does not jump
  when a token's entropy crosses tau; it tends to the hard gate as ``s -> 0`` (0.5 at ``H_T = tau``).
  With it ``num_gated`` is the sum of the weights and ``fkl_gated`` the weight-averaged forward KL.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["GATES", "hard_gate", "hard_ge_gate", "sigmoid_gate"]


def hard_gate(entropy: torch.Tensor, cfg) -> torch.Tensor:
    """The paper's gate: ``g_t = 1[H_T(t) > tau]`` (strict; Jin et al. 2026, Eq. 9).

    Args:
        entropy: ``[B, S]`` teacher entropy in nats (any float dtype).
        cfg: the loss settings (reads ``cfg.tau``, nats).
    Returns:
        ``[B, S]`` fp32 weights, 1.0 where ``entropy > tau`` else 0.0.
    """
    return (entropy > cfg.tau).float()


def hard_ge_gate(entropy: torch.Tensor, cfg) -> torch.Tensor:
    """The authors' public code's gate: ``g_t = 1[H_T(t) >= tau]`` (docs/method.md, "Comparing ...").

    Args and returns: as :func:`hard_gate` (1.0 also at ``entropy == tau``).
    """
    return (entropy >= cfg.tau).float()


def sigmoid_gate(entropy: torch.Tensor, cfg) -> torch.Tensor:
    """A soft gate: ``g_t = sigmoid((H_T(t) - tau) / s)``, ``s = cfg.gate_sharpness`` (nats, > 0).

    Args:
        entropy: ``[B, S]`` teacher entropy in nats.
        cfg: the loss settings (reads ``tau`` and ``gate_sharpness``, both nats).
    Returns:
        ``[B, S]`` fp32 weights in [0, 1]; 0.5 at ``tau``; within 1e-7 of :func:`hard_gate` once
        ``|H_T - tau| > 16 s``, so it tends to the hard gate (off ties) as ``s -> 0``.
    Source: this project's extension (docs/method.md, "Objectives beyond the paper"): a smooth
    weighting in place of the mask, as Relax's port of EOPD weights the forward KL by the teacher's
    entropy instead of masking it.
    """
    return torch.sigmoid((entropy.float() - cfg.tau) / cfg.gate_sharpness)


#: Gate name -> function ``(entropy [B, S], cfg) -> weights [B, S] fp32 in [0, 1]``.
GATES: dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {
    "hard": hard_gate,
    "hard_ge": hard_ge_gate,
    "sigmoid": sigmoid_gate,
}
