"""What one rollout samples (:class:`RolloutParams`) and how the engine is built (:class:`RolloutConfig`).

Both are validated pydantic models and the single home of their rules: :class:`RolloutConfig` is
also the ``rollout`` section of the trainer's YAML schema, and evaluation builds
:class:`RolloutParams` for its own sampling settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from megatron_eaopd.settings import FrozenSettings

__all__ = ["RolloutParams", "RolloutConfig", "EngineKind", "sampling_seed"]

EngineKind = Literal["auto", "static", "dynamic", "recompute"]


class RolloutParams(FrozenSettings):
    """Sampling settings of one ``generate`` call (paper training: n=1, T=1.0, top-p 1.0, 4096 tokens).

    Attributes:
        n: samples per prompt (>= 1).
        temperature: > 0; logits are divided by it before sampling (paper 1.0).
        top_p: nucleus mass in (0, 1]; 1.0 = no filter (paper 1.0 for training, 0.8 for evaluation).
        max_new_tokens: response budget in tokens (>= 1), the stop token not counted (paper 4096).
        seed: base seed of the sampler (see :func:`sampling_seed`).
    Raises:
        pydantic.ValidationError (a ``ValueError``) naming the field on an out-of-range value.
    """

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(4096, ge=1)
    seed: int = 1234


class RolloutConfig(RolloutParams):
    """The trainer's ``rollout`` section: the sampling settings plus how the engine is built.

    Attributes:
        engine: ``auto`` (recompute at PP > 1; dynamic with CUDA and a flash-attn that megatron-core's
            dynamic batching accepts; else static), ``static``, ``dynamic`` or ``recompute``.
        max_batch_size: sequences per engine batch (default: all of a rank's rows at once).
        kv_buffer_gb: KV-cache buffer of the dynamic engine per GPU (GiB; freed between rollouts).
    """

    model_config = ConfigDict(frozen=False, extra="forbid", validate_assignment=True, allow_inf_nan=False)

    engine: EngineKind = "auto"
    max_batch_size: int | None = Field(None, ge=1)
    kv_buffer_gb: float = Field(20.0, gt=0)

    def params(self) -> RolloutParams:
        """The sampling settings alone."""
        return RolloutParams(**{k: getattr(self, k) for k in RolloutParams.model_fields})


def sampling_seed(seed: int, call_index: int, dp_rank: int = 0) -> int:
    """Seed of the sampler for one generate call.

    ``seed + 1_000_003 * call_index + 7_919 * dp_rank`` (mod 2**63): distinct per call and per DP
    rank, identical across the TP (and PP) ranks of one model replica (they sample from the same
    gathered logits; nothing is broadcast).
    """
    return (int(seed) + 1_000_003 * int(call_index) + 7_919 * int(dp_rank)) % (2**63)
