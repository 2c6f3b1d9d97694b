"""Check a conversion: Megatron logits against transformers' on a fixed prompt.

:func:`verify_logits` runs the built Megatron chunks (any TP/PP) and the HF reference model on the
same token ids and reports the largest logit difference and the top-1 agreement, identical on every
rank; :func:`require_passed` turns a failed check into an error.

Source: the comparison Megatron-Bridge runs after ``AutoBridge.import_ckpt`` (``compare_hf_and_megatron``),
simplified to one prompt.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_eaopd.distributed import collective_device, unwrap
from megatron_eaopd.models.provider import forward_logits

__all__ = ["DEFAULT_PROMPT", "verify_logits", "require_passed"]

DEFAULT_PROMPT = "The capital of France is Paris. Two plus three equals"


def _hf_reference(hf_dir, weight_dtype: torch.dtype | None):
    # deferred: transformers is heavy and only the verification needs it
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf.eval()
    if weight_dtype is not None and weight_dtype != torch.float32:
        for p in hf.parameters():
            p.data = p.data.to(weight_dtype).float()
    return hf


def _prompt_ids(assets_dir, vocab: int, prompt: str | None) -> torch.Tensor:
    """``[1, s]`` int64 ids of ``prompt`` from the folder's tokenizer; 16 fixed ids when there is none."""
    try:
        from transformers import AutoTokenizer  # deferred: heavy, verification only

        tok = AutoTokenizer.from_pretrained(str(assets_dir))
        ids = tok(prompt or DEFAULT_PROMPT, return_tensors="pt").input_ids
        if ids.numel() >= 2 and int(ids.max()) < vocab:
            return ids
    except Exception:
        pass
    return (torch.arange(16, dtype=torch.long) * 7919 % vocab).unsqueeze(0)


@torch.no_grad()
def verify_logits(model_chunks: list, hf_dir: str | os.PathLike, *, weight_dtype: torch.dtype | None = None,
                  atol: float = 1e-3, prompt: str | None = None, hf_model=None) -> dict:
    """Compare Megatron logits with transformers' on a fixed prompt (collective over the world).

    The HF model runs in fp32 on the CPU; with ``weight_dtype`` (e.g. bf16) its weights are first
    rounded to that dtype, so both sides hold identical values and the check measures the conversion
    only. The Megatron chunks should hold fp32 (or upcast) weights; their logits (on their own device)
    are compared on the CPU. The per-rank results are max-reduced on the collective device
    (:func:`~megatron_eaopd.distributed.collective_device`: CUDA under NCCL, CPU under gloo).

    Args:
        model_chunks: built and loaded model chunks (any TP/PP).
        hf_dir: HF folder (weights + tokenizer; no tokenizer -> fixed ids).
        atol: pass threshold on max |logit diff|.
        hf_model: an already-loaded HF model to use instead of loading ``hf_dir``.
    Returns:
        ``{"max_abs_diff": float, "top1_agreement": float in [0,1], "tokens": int, "passed": bool}``
        (identical on every rank).
    """
    info = unwrap(model_chunks[0]).model_info
    ids = _prompt_ids(hf_dir, info.true_vocab_size, prompt)
    out = forward_logits(model_chunks, ids)
    stats = torch.zeros(3, dtype=torch.float64, device=collective_device())
    if out is not None:
        out = out.float().cpu()
        hf = hf_model if hf_model is not None else _hf_reference(hf_dir, weight_dtype)
        ref = hf(ids).logits.float().cpu()
        del hf
        stats[0] = (out - ref).abs().max().item()
        stats[1] = 1.0 - (out.argmax(-1) == ref.argmax(-1)).double().mean().item()
        stats[2] = 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    diff, disagree = float(stats[0]), float(stats[1])
    return {"max_abs_diff": diff, "top1_agreement": 1.0 - disagree, "tokens": int(ids.numel()),
            "passed": bool(diff <= atol)}


def require_passed(res: dict, atol: float) -> dict:
    """Return a :func:`verify_logits` result, or raise RuntimeError when it failed the tolerance."""
    if not res["passed"]:
        raise RuntimeError(f"verification failed: max |logit diff| {res['max_abs_diff']:.3g} > atol {atol} "
                           f"(top-1 agreement {res['top1_agreement']:.3f})")
    return res
