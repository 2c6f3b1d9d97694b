"""Which GPU kernels this process can use: Transformer Engine and FlashAttention.

Both answers are False on a machine without CUDA. They are read by the model builder (TE layer spec
or the local one) and by the rollout engine choice (megatron-core's dynamic inference engine needs
FlashAttention).

Source: megatron-core 0.19.2 ``megatron/core/transformer/attention.py``: the module-level imports that
set ``HAVE_FA4`` / ``HAVE_FA3`` / ``flash_attn_with_kvcache``, and the assertion in
``Attention.forward`` for dynamic batching: ``HAVE_FA4 or HAVE_FA3 or is_fa_min_version("2.7.3")``.
"""

from __future__ import annotations

import functools
from importlib.metadata import version

import torch
from packaging.version import InvalidVersion, Version

__all__ = ["te_available", "flash_attn_available", "flash_attn_unavailable_reason", "flash_attn_decision", "FA2_MIN_VERSION"]

#: the oldest FlashAttention-2 that megatron-core 0.19.2 accepts for dynamic batching
FA2_MIN_VERSION = "2.7.3"


def te_available() -> bool:
    """True when CUDA is present and ``transformer_engine`` imports (the TE layer spec is usable)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401  (optional GPU dependency, probed only)
    except Exception:
        return False
    return True


def flash_attn_decision(cuda: bool, have_fa4: bool, have_fa3: bool, fa2_version: str | None) -> str | None:
    """The rule megatron-core 0.19.2 applies before dynamic batching, as a pure function.

    Args:
        cuda: a CUDA device is present.
        have_fa4: FlashAttention-4 imports (``flash_attn.cute``, distribution ``flash-attn-4`` >= 4.0.0b20).
        have_fa3: FlashAttention-3 imports (``flash_attn_3.flash_attn_interface`` or ``flashattn_hopper``).
        fa2_version: ``flash_attn.__version__`` when FlashAttention-2 (``flash_attn_varlen_func``,
            ``flash_attn_with_kvcache``) imports, else ``None``.
    Returns:
        ``None`` when the dynamic engine's attention can run, else a one-line reason (for a warning).
    Raises:
        ValueError: ``fa2_version`` is not a version string.
    """
    if not cuda:
        return "no CUDA device (FlashAttention kernels are GPU-only)"
    if have_fa4 or have_fa3:
        return None
    if fa2_version is None:
        return (f"flash-attn is not installed (megatron-core's dynamic engine needs flash-attn >= {FA2_MIN_VERSION}, "
                f"FlashAttention-3 or FlashAttention-4)")
    try:
        ok = Version(fa2_version) >= Version(FA2_MIN_VERSION)
    except InvalidVersion:
        raise ValueError(f"flash_attn reports an unparseable version {fa2_version!r}") from None
    if ok:
        return None
    return f"flash-attn {fa2_version} is too old (megatron-core's dynamic engine needs >= {FA2_MIN_VERSION})"


@functools.lru_cache(maxsize=1)
def flash_attn_unavailable_reason() -> str | None:
    """Why megatron-core's dynamic inference engine cannot run here, or ``None`` when it can.

    Reads the flags megatron-core itself set when it imported its attention module, so the answer
    is the one its ``Attention.forward`` will reach (cached: the flags are fixed at import).
    """
    if not torch.cuda.is_available():
        return flash_attn_decision(False, False, False, None)
    # deferred: megatron-core's attention module is heavy and only needed on a CUDA machine
    from megatron.core.transformer import attention as mattn

    fa2 = None
    if mattn.flash_attn_with_kvcache is not None and mattn.flash_attn_varlen_func is not None:
        import flash_attn  # noqa: F401  (optional GPU dependency; importable, as megatron-core found)

        fa2 = str(getattr(flash_attn, "__version__", None) or version("flash-attn"))
    return flash_attn_decision(True, bool(mattn.HAVE_FA4), bool(mattn.HAVE_FA3), fa2)


def flash_attn_available() -> bool:
    """True when CUDA is present and a FlashAttention usable by megatron-core 0.19.2's dynamic batching
    imports: flash-attn >= 2.7.3, FlashAttention-3 or FlashAttention-4 (see :func:`flash_attn_decision`)."""
    return flash_attn_unavailable_reason() is None
