"""The frozen teacher: scores the student's rollouts and returns per-token :class:`TeacherSignals`.

The teacher is a Megatron ``GPTModel`` in the student's TP/PP layout (same process groups), frozen
(no gradients, eval mode). Scoring runs forward-only over micro-batches; on the last pipeline stage
each micro-batch's vocab-parallel logits become ``TeacherSignals`` (target log-prob, full-vocabulary
entropy, global top-k) and the logits themselves are dropped, so only ``O(B * S * k)`` numbers are
kept. ``offload=True`` moves the weights to host memory between scoring phases.
"""

from __future__ import annotations

import torch

from megatron_eaopd.loss import EOPDConfig, TeacherSignals, teacher_signals
from megatron_eaopd.pipeline import MicroBatch, forward_only

__all__ = ["Teacher"]


class Teacher:
    """Frozen teacher model chunks plus the scoring phase.

    Args:
        model_chunks: built by :func:`megatron_eaopd.models.provider.build_gpt_model` in the student's
            layout, weights loaded.
        loss_cfg: the :class:`EOPDConfig` (temperature, top-k, true vocabulary size).
        offload: keep weights on the host between phases (GPU only; no-op on CPU).
    """

    def __init__(self, model_chunks: list, loss_cfg: EOPDConfig, offload: bool = False):
        self.model_chunks = model_chunks
        self.cfg = loss_cfg
        self.offload = offload and torch.cuda.is_available()
        for m in model_chunks:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        if self.offload:
            self._to("cpu")

    def _to(self, device) -> None:
        for m in self.model_chunks:
            m.to(device)

    def logits_for(self, mb: MicroBatch) -> torch.Tensor:
        """Teacher logits ``[mb, S-1, V_local]`` for one micro-batch (PP = 1 only; for mode="full")."""
        with torch.no_grad():
            return self.model_chunks[0](mb.inputs, mb.position_ids, None)

    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch]) -> dict[int, TeacherSignals]:
        """Teacher signals for every micro-batch (keys: micro-batch index) on the last pipeline stage.

        Returns an empty dict on other stages. Collective over the model-parallel group.
        """
        if self.offload:
            self._to(torch.cuda.current_device())
        out: dict[int, TeacherSignals] = {}

        def on_logits(mb: MicroBatch, logits: torch.Tensor) -> None:
            out[mb.index] = teacher_signals(logits, mb.targets, self.cfg, keep_logits=False)

        try:
            forward_only(self.model_chunks, micro_batches, on_logits)
        finally:
            if self.offload:
                self._to("cpu")
                torch.cuda.empty_cache()
        return out
