"""Entropy gates: which tokens get the forward-KL term, and with what weight.

A gate maps the teacher's full-vocabulary entropy ``H_T`` (nats, ``[B, S]`` fp32) and the loss
settings to per-token weights ``g_t`` in [0, 1] (``[B, S]`` fp32, no gradient); the per-token loss is
``l_rkl + alpha * g_t * l_fkl`` (paper Eq. 9). Each gate is one function in :data:`GATES`; the
``gate`` field of :class:`megatron_eaopd.loss.EOPDConfig` names it, so a new gate is one function
here (plus any setting it reads, as a field of ``EOPDConfig``).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["GATES", "hard_gate"]


def hard_gate(entropy: torch.Tensor, cfg) -> torch.Tensor:
    """The paper's gate: ``g_t = 1[H_T(t) > tau]`` (strict; Jin et al. 2026, Eq. 9).

    Args:
        entropy: ``[B, S]`` teacher entropy in nats (any float dtype).
        cfg: the loss settings (reads ``cfg.tau``, nats).
    Returns:
        ``[B, S]`` fp32 weights, 1.0 where ``entropy > tau`` else 0.0.
    """
    return (entropy > cfg.tau).float()


#: Gate name -> function ``(entropy [B, S], cfg) -> weights [B, S] fp32 in [0, 1]``.
GATES: dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {
    "hard": hard_gate,
}
