"""The frozen teacher: serves the objective what it asks for, per micro-batch of the student's rollouts.

The teacher is a Megatron ``GPTModel`` in the student's TP/PP layout (same process groups), frozen
(no gradients, eval mode). :meth:`Teacher.score` returns :class:`TeacherScores`, whose
``for_micro_batch(mb)`` gives the :class:`~megatron_eaopd.loss.TeacherSignals` of that micro-batch:

* objective payload ``"signals"``: one forward-only pass over every micro-batch in the teacher phase;
  on the last pipeline stage each micro-batch's vocab-parallel logits become signals (target log-prob,
  full-vocabulary entropy, top-k: ``O(B * S * k)`` numbers) and the logits are dropped;
* payload ``"logits"``: nothing runs in the teacher phase; each micro-batch's logits are produced
  inside the student's update step, when asked for, and freed with it (PP = 1).

``offload=True`` (GPU) keeps the weights in pinned host memory between phases: the host copy is made
once (the teacher never changes), offloading only drops the device tensors, and loading back is a
non-blocking copy from pinned memory.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_eaopd.loss import Objective, TeacherSignals
from megatron_eaopd.pipeline import MicroBatch, forward_only

__all__ = ["Teacher", "TeacherScores"]


class TeacherScores:
    """The teacher's contribution to one iteration, looked up per micro-batch.

    Args:
        signals: precomputed signals by micro-batch index (payload ``"signals"``; empty on stages
            other than the last pipeline stage), or None.
        compute: a function ``mb -> TeacherSignals`` run on demand (payload ``"logits"``), or None.
    """

    def __init__(self, signals: dict[int, TeacherSignals] | None = None,
                 compute: Callable[[MicroBatch], TeacherSignals] | None = None):
        self.signals = signals if signals is not None else {}
        self.compute = compute

    def for_micro_batch(self, mb: MicroBatch) -> TeacherSignals:
        """The signals of micro-batch ``mb`` (computed now for a ``"logits"`` payload).

        Raises:
            KeyError: no signals were computed for ``mb.index`` (e.g. asked on a non-last stage).
        """
        if self.compute is not None:
            return self.compute(mb)
        return self.signals[mb.index]


class Teacher:
    """Frozen teacher model chunks and the scoring phase.

    Args:
        model_chunks: built by :func:`megatron_eaopd.models.provider.build_gpt_model` in the student's
            layout, weights loaded.
        objective: the :class:`~megatron_eaopd.loss.Objective` whose ``teacher_payload`` and
            ``teacher_signals`` decide what scoring produces.
        offload: keep weights in pinned host memory between phases (GPU only; ignored on CPU).
    """

    def __init__(self, model_chunks: list, objective: Objective, offload: bool = False):
        self.model_chunks = model_chunks
        self.objective = objective
        self.offload = offload and torch.cuda.is_available()
        self._host: list[torch.Tensor] = []
        for m in model_chunks:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        if self.offload:
            self._host = [p.detach().to("cpu").pin_memory() for p in self._params()]
            self._release()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.model_chunks for p in m.parameters()]

    def _release(self) -> None:
        for p, h in zip(self._params(), self._host):
            p.data = h  # the device copy is dropped; the pinned host copy is the parameter meanwhile

    def _acquire(self) -> None:
        dev = torch.cuda.current_device()
        for p, h in zip(self._params(), self._host):
            p.data = torch.empty_like(h, device=dev).copy_(h, non_blocking=True)

    def logits_for(self, mb: MicroBatch) -> torch.Tensor:
        """Teacher logits ``[mb, S, V_local]`` (model dtype) for one micro-batch (PP = 1; payload ``"logits"``)."""
        with torch.no_grad():
            return self.model_chunks[0](mb.inputs, mb.position_ids, None)

    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch]) -> TeacherScores:
        """The teacher phase: what the objective needs for every micro-batch (collective over the model-parallel group).

        Returns:
            :class:`TeacherScores` (payload ``"signals"``: computed now, held on the last pipeline stage;
            payload ``"logits"``: computed per micro-batch on demand).
        """
        if self.objective.teacher_payload == "logits":
            return TeacherScores(compute=lambda mb: self.objective.teacher_signals(self.logits_for(mb), mb.targets))
        if self.offload:
            self._acquire()
        out: dict[int, TeacherSignals] = {}

        def on_logits(mb: MicroBatch, logits: torch.Tensor) -> None:
            out[mb.index] = self.objective.teacher_signals(logits, mb.targets)

        try:
            forward_only(self.model_chunks, micro_batches, on_logits)
        finally:
            if self.offload:
                self._release()
                torch.cuda.empty_cache()
        return TeacherScores(signals=out)
