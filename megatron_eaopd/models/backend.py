"""Which optional GPU backends this process can use: Transformer Engine and flash-attn.

Both checks are False without CUDA. They decide the layer spec (TE or local), whether sequence
parallelism is possible (it needs TE's norms), and whether megatron-core's dynamic inference engine
can run (its dynamic batching asserts flash-attn >= 2.7.3, FA3 or FA4).
"""

from __future__ import annotations

import torch

__all__ = ["te_available", "flash_attn_available"]


def te_available() -> bool:
    """True when CUDA is present and ``transformer_engine`` imports (TE layer spec usable)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401  (optional GPU package: probed, not needed)
    except Exception:  # noqa: BLE001 - any import failure (missing libs, cudnn) means "not usable"
        return False
    return True


def flash_attn_available() -> tuple[bool, str]:
    """Whether megatron-core 0.19's dynamic batching can run here, and why not.

    Mirrors the check in ``megatron/core/transformer/attention.py`` (``Attention.forward`` with a
    dynamic inference context): flash-attn 4 (``flash_attn.cute``), flash-attn 3 (``flash_attn_3`` /
    ``flashattn_hopper``) or flash-attn >= 2.7.3.

    Returns:
        ``(ok, reason)``; ``reason`` is a one-line explanation when ``ok`` is False, else "".
    """
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:  # deferred: importing megatron's attention module takes seconds and matters only with CUDA
        from megatron.core.transformer import attention
        from megatron.core.utils import is_fa_min_version
    except Exception as e:  # noqa: BLE001
        return False, f"megatron-core attention does not import ({e})"
    if getattr(attention, "HAVE_FA4", False) or getattr(attention, "HAVE_FA3", False):
        return True, ""
    try:
        if is_fa_min_version("2.7.3"):
            return True, ""
    except Exception:  # noqa: BLE001 - flash-attn absent: the version lookup fails
        pass
    return False, "megatron-core's dynamic batching needs flash-attn >= 2.7.3 (or FA3/FA4), which does not import"
