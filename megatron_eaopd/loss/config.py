"""The loss settings: :class:`EOPDConfig`, also the ``loss:`` section of the run configuration's YAML schema.

Paper values are the defaults (Jin et al. 2026, arXiv 2603.07079; docs/method.md); every variant
beyond the paper is off by default, so a recipe that does not name it trains the paper's objective.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from megatron_eaopd.loss.gates import GATES
from megatron_eaopd.settings import FrozenSettings

__all__ = ["EOPDConfig"]


class EOPDConfig(FrozenSettings):
    """Hyperparameters of the EOPD loss (docs/method.md; paper values are the defaults).

    This one class is both the runtime configuration of the loss and the ``loss`` section of the
    trainer's YAML schema (:class:`megatron_eaopd.config.Config`): its rules live here only.

    Attributes:
        mode: ``"topk"`` (the paper, Eq. 7-10) or ``"full"`` (exact full-vocabulary KLs).
        tau: teacher-entropy threshold in nats (>= 0). Paper 0.8. With ``tau_quantile`` set it is
            replaced every iteration (and used only if the global batch holds no valid token).
        alpha: weight of the forward-KL term (>= 0); 0 gives plain OPD. Paper 1.0.
        clip_eps: PPO clip range of the ratio in the reverse-KL term (topk mode), in (0, 1). 0.2 (verl).
        top_k: size of the teacher's top-k support K_t (>= 1). Paper 16.
        fkl_support: ``"renormalize"`` (the paper's reading; NOT zero when student == teacher),
            ``"raw"`` or ``"tail"`` (a true KL over K_t plus one rest bucket); docs/method.md.
        gate: the entropy gate, a name in :data:`megatron_eaopd.loss.gates.GATES`: ``"hard"``
            (default, ``H_T > tau``: paper Eq. 9 as written), ``"hard_ge"`` (``H_T >= tau``: the
            authors' code) or ``"sigmoid"`` (``sigmoid((H_T - tau) / gate_sharpness)``).
        gate_sharpness: width s of the sigmoid gate in nats (> 0; read by ``gate="sigmoid"`` only).
            The weight goes from 0.12 to 0.88 over tau +- 2 s; s -> 0 is the hard gate.
        tau_quantile: None (tau in nats, the paper) or q in (0, 1): tau is set every iteration to the
            q-quantile of the teacher's entropy over all valid tokens of the global batch (every
            micro-batch and DP rank), so about a fraction 1 - q of the tokens passes the hard gate.
        rkl_baseline: ``"none"`` (the paper) or ``"kl"``: in topk mode the sampled-token advantage
            becomes ``A_t + KL(pi_theta || pi_T)(s_t)`` (detached; the KL over the teacher's top-k plus
            one rest bucket), a control variate that leaves the expected gradient unchanged (vOPD,
            arXiv 2605.07865). In full mode the reverse-KL term is already exact (its gradient is the
            expectation of the baselined estimator), so the loss is the same with either value.
        temperature: both models' logits are divided by it before any softmax (> 0). Paper 1.0.
        vocab_size: the tokenizer's true vocabulary size (>= 1); padded rows beyond it get zero
            probability. None = every logit column is a real token (the trainer fills it in at start).
    Raises:
        pydantic.ValidationError (a ``ValueError``): an unknown key, mode, support, gate or baseline,
        an out-of-range number, inf/NaN, or ``top_k > vocab_size``; the message names the field.
    """

    mode: Literal["topk", "full"] = "topk"
    tau: float = Field(0.8, ge=0)
    alpha: float = Field(1.0, ge=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    top_k: int = Field(16, ge=1)
    fkl_support: Literal["renormalize", "raw", "tail"] = "renormalize"
    gate: str = "hard"
    gate_sharpness: float = Field(0.1, gt=0)
    tau_quantile: float | None = Field(None, gt=0, lt=1)
    rkl_baseline: Literal["none", "kl"] = "none"
    temperature: float = Field(1.0, gt=0)
    vocab_size: int | None = Field(None, ge=1)

    @field_validator("gate")
    @classmethod
    def _known_gate(cls, v: str) -> str:
        if v not in GATES:
            raise ValueError(f"gate {v!r} is not one of {sorted(GATES)}")
        return v

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.vocab_size is not None and self.top_k > self.vocab_size:
            raise ValueError(f"top_k ({self.top_k}) exceeds vocab_size ({self.vocab_size})")
        return self

    def with_vocab_size(self, vocab_size: int) -> "EOPDConfig":
        """A validated copy with ``vocab_size`` set (the tokenizer's true vocabulary, resolved at start)."""
        return EOPDConfig(**{**self.model_dump(), "vocab_size": int(vocab_size)})

    def with_tau(self, tau: float) -> "EOPDConfig":
        """A validated copy with the threshold ``tau`` (nats, >= 0), e.g. the iteration's entropy quantile."""
        return EOPDConfig(**{**self.model_dump(), "tau": float(tau)})
