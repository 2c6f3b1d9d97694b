"""The one factory of rollout engines, used by the trainer and by evaluation (:func:`make_engine`)."""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core import parallel_state as ps

from megatron_eaopd.distributed import print_rank0
from megatron_eaopd.settings import ConfigError
from megatron_eaopd.models.backend import flash_attn_unavailable_reason
from megatron_eaopd.rollout.engine import RolloutEngine
from megatron_eaopd.rollout.params import EngineKind

__all__ = ["select_engine_kind", "make_engine"]


def select_engine_kind(requested: EngineKind, pipeline_parallel: int, cuda: bool) -> tuple[str, str]:
    """Which engine runs, and why (``(kind, reason)``; reason is "" when nothing was overridden).

    ``auto``: ``recompute`` at PP > 1 (the KV-cache engines here are PP = 1); ``dynamic`` with CUDA
    when a flash-attn that megatron-core's dynamic batching accepts imports; else ``static``.
    ``static`` / ``dynamic`` at PP > 1 run the recompute engine, with the reason.

    Raises:
        ConfigError: ``dynamic`` requested without CUDA or without a usable flash-attn (names what
            is missing).
    """
    if requested in ("static", "dynamic") and pipeline_parallel > 1:
        return "recompute", (f"rollout.engine={requested!r} needs pipeline_model_parallel_size == 1 (got "
                             f"{pipeline_parallel}); sampling with the recompute engine (no KV cache) instead")
    if requested == "auto":
        if pipeline_parallel > 1:
            return "recompute", ""
        if not cuda:
            return "static", ""
        why = flash_attn_unavailable_reason()
        return ("static", f"dynamic inference engine unavailable ({why}); using the static engine") if why else ("dynamic", "")
    if requested == "dynamic":
        if not cuda:
            raise ConfigError("config error at rollout.engine: 'dynamic' needs CUDA (flash-attn); use 'static' or "
                              "'auto' on CPU")
        why = flash_attn_unavailable_reason()
        if why:
            raise ConfigError(f"config error at rollout.engine: 'dynamic' cannot run here: {why}; use 'auto' or 'static'")
    return requested, ""


def make_engine(model_chunks: list, tokenizer, *, stop_ids: Sequence[int], kind: EngineKind = "auto",
                max_batch_size: int | None = None, kv_buffer_gb: float = 20.0, progress: bool = False,
                true_vocab_size: int | None = None) -> RolloutEngine:
    """Build the rollout engine for the student's model chunks (used by training and evaluation).

    Args:
        model_chunks: model chunks at the current TP/PP (DDP-wrapped or not), weights loaded.
        tokenizer: the Hugging Face tokenizer.
        stop_ids: ids that end a response (:func:`megatron_eaopd.rollout.stops.stop_token_ids`).
        kind: ``auto`` | ``static`` | ``dynamic`` | ``recompute`` (see :func:`select_engine_kind`).
        max_batch_size: sequences per engine batch (None: all rows of a call).
        kv_buffer_gb: the dynamic engine's KV-cache buffer (GiB).
        progress: show the engine's progress bar.
        true_vocab_size: ids at or beyond it are never sampled (the vocabulary the student and teacher share;
            None: the model's own ``true_vocab_size``).
    Returns:
        a :class:`RolloutEngine`.
    Raises:
        ConfigError: see :func:`select_engine_kind`. ValueError: no stop id.
    """
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    chosen, why = select_engine_kind(kind, pp, torch.cuda.is_available())
    if why:
        print_rank0(f"[eopd] {why}")
    common = dict(max_batch_size=max_batch_size, progress=progress, true_vocab_size=true_vocab_size)
    # deferred: megatron-core's inference engines call faulthandler.enable() at import, which fails where
    # stderr has no file descriptor (notebooks, captured output); import them only when one is built
    if chosen == "static":
        from megatron_eaopd.rollout.static import StaticEngine

        return StaticEngine(model_chunks, tokenizer, stop_ids, **common)
    if chosen == "dynamic":
        from megatron_eaopd.rollout.dynamic import DynamicEngine

        return DynamicEngine(model_chunks, tokenizer, stop_ids, kv_buffer_gb=kv_buffer_gb, **common)
    from megatron_eaopd.rollout.recompute import RecomputeEngine

    return RecomputeEngine(model_chunks, tokenizer, stop_ids, **common)
