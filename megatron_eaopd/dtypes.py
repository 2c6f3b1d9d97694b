"""Parameter dtypes by name: ``"bf16"`` / ``"bfloat16"`` <-> ``torch.bfloat16``.

One home for the spellings that recipes, checkpoints' ``eaopd_checkpoint.json`` and HF configs use
(``config.json`` writes ``"bfloat16"``). Depends on torch only, so both :mod:`megatron_eaopd.checkpoint`
and :mod:`megatron_eaopd.models` import it.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "parse_dtype", "dtype_name"]

#: accepted names (short and torch spellings) -> dtype
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(d: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """Parse ``"bf16"|"fp16"|"fp32"`` (or the long torch names, or a ``torch.dtype``); ``None`` -> ``default``.

    Raises:
        ValueError: unknown name (the message lists the accepted ones).
    """
    if d is None:
        return default
    if isinstance(d, torch.dtype):
        return d
    key = str(d).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]


def dtype_name(d: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF configs use)."""
    return str(d).replace("torch.", "")
