"""Micro-batches of sequences and forward-only passes through Megatron's pipeline schedules.

Every phase that reads logits (teacher scoring, old log-probs, recompute sampling at PP > 1) runs the
same way: the rank's sequences are cut into micro-batches of equal shape, pushed through
``megatron.core.pipeline_parallel.get_forward_backward_func()`` with ``forward_only=True``, and a
callback receives each micro-batch's vocab-parallel logits on the last pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MicroBatch", "padded_length", "split_micro_batches", "forward_only", "is_last_stage", "is_first_stage"]


@dataclass
class MicroBatch:
    """Rows ``[start, start + size)`` of a rank's rollout batch, model inputs and targets.

    Attributes:
        index: micro-batch number within the phase.
        rows: ``slice`` of the rank's batch rows.
        inputs: ``[mb, S-1]`` int64 token ids fed to the model (``tokens[:, :-1]``).
        position_ids: ``[mb, S-1]`` int64.
        targets: ``[mb, S-1]`` int64, what the logits at each position predict (``tokens[:, 1:]``).
        loss_mask: ``[mb, S-1]`` bool, response tokens that count.
    """

    index: int
    rows: slice
    inputs: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (>= 1)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return -(-int(length) // multiple) * multiple


def split_micro_batches(tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int,
                        device: torch.device | str = "cpu", *, seq_multiple: int = 1,
                        pad_id: int | None = None) -> list[MicroBatch]:
    """Cut ``tokens [B, S]`` / ``loss_mask [B, S-1]`` into micro-batches of ``micro_batch_size`` rows.

    Args:
        tokens: ``[B, S]`` int64 prompt + response token ids (right-padded).
        loss_mask: ``[B, S-1]`` bool, what ``tokens[:, 1:]`` counts in the loss.
        micro_batch_size: rows per micro-batch.
        device: where the micro-batches live (the compute device).
        seq_multiple: pad the model-input length ``S-1`` to a multiple of this with masked positions
            (sequence parallelism scatters the sequence over TP ranks, so it must divide evenly;
            Megatron's ``scatter_to_sequence_parallel_region``).
        pad_id: token id of the padding positions (default: ``tokens[0, -1]``, i.e. the batch's own
            right padding). Padded positions have ``loss_mask`` False and continue the positions.
    Returns:
        micro-batches in row order, all of the same shape.
    Raises:
        ValueError: if ``B`` is not a multiple of ``micro_batch_size`` (pipeline schedules need equal shapes).
    """
    b, s = tokens.shape
    if b % micro_batch_size:
        raise ValueError(f"{b} sequences cannot be cut into micro-batches of {micro_batch_size}")
    width = padded_length(s - 1, seq_multiple)
    if width > s - 1:
        pad = int(tokens[0, -1]) if pad_id is None else int(pad_id)
        tokens = torch.cat([tokens, tokens.new_full((b, width - (s - 1)), pad)], dim=1)
        loss_mask = torch.cat([loss_mask, loss_mask.new_zeros((b, width - (s - 1)))], dim=1)
    pos = torch.arange(width, dtype=torch.long).unsqueeze(0)
    out = []
    for i, r0 in enumerate(range(0, b, micro_batch_size)):
        rows = slice(r0, r0 + micro_batch_size)
        t = tokens[rows].to(device)
        out.append(MicroBatch(i, rows, t[:, :-1].contiguous(), pos.expand(micro_batch_size, width).contiguous().to(device),
                              t[:, 1:].contiguous(), loss_mask[rows].to(device)))
    return out


def is_last_stage() -> bool:
    """True on the last pipeline stage (or without pipeline parallelism)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


def is_first_stage() -> bool:
    """True on the first pipeline stage (or without pipeline parallelism)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(ignore_virtual=True)


@torch.no_grad()
def forward_only(model_chunks: list, micro_batches: list[MicroBatch], on_logits: Callable[[MicroBatch, torch.Tensor], None],
                 *, pg_collection=None, output_processor: Callable | None = None) -> None:
    """Run ``model_chunks`` forward on every micro-batch through Megatron's pipeline schedule.

    Args:
        model_chunks: one model chunk (possibly DDP-wrapped), built for the current TP/PP.
        micro_batches: equal-shape micro-batches (:func:`split_micro_batches`).
        on_logits: called on the LAST pipeline stage with each micro-batch and its output: logits
            ``[mb, S-1, V_local]`` (vocab-parallel, model dtype), or what ``output_processor`` returns;
            not called on other stages.
        pg_collection: the model's own ``ProcessGroupCollection`` (a teacher in its own layout): the
            schedule then runs over its PP group (pipeline size, p2p ranks) instead of the global
            ``parallel_state``. None: the global state.
        output_processor: passed to ``GPTModel.forward`` (megatron-core's hook that receives the final
            hidden states and the output layer instead of computing logits), e.g. to return hidden states.
    Source: ``get_forward_backward_func()(..., forward_only=True)`` as Megatron-LM's evaluation loop uses it;
    with a collection, ``get_forward_backward_func(pp_size=...)`` and an explicit ``P2PCommunicator``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.utils import get_model_config

    if not micro_batches:
        return
    for m in model_chunks:
        m.eval()
    it = iter(micro_batches)
    extra = {} if output_processor is None else {"output_processor": output_processor}

    def step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.inputs, mb.position_ids, None, **extra)

        def loss_func(logits):
            on_logits(mb, logits)
            return logits.new_zeros(()), {}

        return out, loss_func

    mb0 = micro_batches[0]
    kw = dict(forward_step_func=step, data_iterator=it, model=model_chunks, num_microbatches=len(micro_batches),
              seq_length=mb0.inputs.shape[1], micro_batch_size=mb0.inputs.shape[0], forward_only=True)
    if pg_collection is None:
        get_forward_backward_func()(**kw)
        return
    pp = pg_collection.pp.size()
    fb = get_forward_backward_func(pp_size=pp, vp_size=None)
    if pp > 1:
        kw["p2p_communicator"] = P2PCommunicator(pg_collection.pp, get_model_config(model_chunks[0]))
    fb(**kw, pg_collection=pg_collection)
