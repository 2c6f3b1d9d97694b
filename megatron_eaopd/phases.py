"""The phases of one EOPD iteration, as functions with plain inputs and outputs.

    prompts --rollout_phase--> RolloutBatch --(micro-batches)--> teacher_phase --> TeacherScores
            --old_log_probs_phase--> {micro-batch: log pi_old}  --update_phase--> UpdateResult (sums)

Each phase takes the components it needs (an engine, the teacher, the student, the objective) and
values, and returns a value: nothing is stored on a shared state, so each phase can be run and tested
alone on tiny models. The trainer (:mod:`megatron_eaopd.trainer`) calls them in order.
Collectives: every phase is called on every rank of the world in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_eaopd.loss import Objective
from megatron_eaopd.pipeline import MicroBatch, forward_only, is_last_stage
from megatron_eaopd.rollout import RolloutBatch, RolloutParams
from megatron_eaopd.rollout.engine import RolloutEngine
from megatron_eaopd.student import Student
from megatron_eaopd.teacher import Teacher, TeacherScores

__all__ = ["UpdateResult", "rollout_phase", "teacher_phase", "old_log_probs_phase", "update_phase",
           "rollout_sums", "reduce_rollout_sums", "counts_once"]


@dataclass
class UpdateResult:
    """What the update phase leaves for the metrics, on this rank.

    Attributes:
        sums: the objective's summed metrics over this rank's micro-batches (0-dim tensors; empty on
            stages other than the last pipeline stage, which holds no logits).
        grad_norms: pre-clip global gradient norm of each optimizer step taken (None entries skipped).
        steps_taken: optimizer steps actually applied (an fp16 step may be skipped).
        lr: learning rate after the last step.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    steps_taken: int = 0
    lr: float = 0.0


def rollout_phase(engine: RolloutEngine, prompt_ids: Sequence[Sequence[int]], params: RolloutParams,
                  call_index: int) -> RolloutBatch:
    """The student samples ``params.n`` responses per prompt of this DP rank's share; the engine then
    releases what it holds between rollouts (the dynamic engine's KV cache).

    Args:
        engine: the rollout engine over the student's model chunks.
        prompt_ids: this rank's prompts as token ids.
        params: sampling settings. call_index: the iteration (seeds the sampler).
    Returns:
        :class:`~megatron_eaopd.rollout.RolloutBatch` (CPU tensors).
    """
    try:
        return engine.generate(prompt_ids, params, call_index=call_index)
    finally:
        engine.release()


def teacher_phase(teacher: Teacher, micro_batches: list[MicroBatch]) -> TeacherScores:
    """The frozen teacher scores the rollouts for the objective (see :meth:`megatron_eaopd.teacher.Teacher.score`)."""
    return teacher.score(micro_batches)


@torch.no_grad()
def old_log_probs_phase(student: Student, objective: Objective, micro_batches: list[MicroBatch]) -> dict[int, torch.Tensor]:
    """``log pi_old(y_t)`` of the sampled tokens, recomputed by the trainer's own forward (docs/method.md:
    the engines' log-probs are raw temperature-1 values, and another kernel path).

    Returns:
        micro-batch index -> ``[mb, S]`` fp32 log-probs (nats); empty on stages other than the last.
    """
    out: dict[int, torch.Tensor] = {}

    def on_logits(mb: MicroBatch, logits: torch.Tensor) -> None:
        out[mb.index] = objective.sampled_log_probs(logits, mb.targets)

    forward_only(student.chunks, micro_batches, on_logits)
    student.train()
    return out


def update_phase(student: Student, objective: Objective, micro_batches: list[MicroBatch], teacher: TeacherScores,
                 old_log_probs: dict[int, torch.Tensor], mini_batches: int) -> UpdateResult:
    """``mini_batches`` optimizer steps, each over an equal share of the micro-batches, through
    Megatron's ``get_forward_backward_func`` with ``calculate_per_token_loss=True``: each step's loss is
    the token mean over its whole mini-batch (every micro-batch and DP rank), as the paper specifies.

    Args:
        student: the trained model, optimizer and schedule.
        objective: the loss (what it needs from the teacher, the loss, the metric sums).
        micro_batches: this rank's micro-batches of the iteration, in order.
        teacher: the teacher phase's output.
        old_log_probs: the old-log-prob phase's output.
        mini_batches: optimizer steps (divides ``len(micro_batches)``).
    Returns:
        :class:`UpdateResult`. Parameters are synced afterwards (:meth:`Student.sync_params`).
    Raises:
        ValueError: ``mini_batches`` does not divide the micro-batches.
    """
    if len(micro_batches) % mini_batches:
        raise ValueError(f"{len(micro_batches)} micro-batches do not split into {mini_batches} optimizer steps")
    per_step = len(micro_batches) // mini_batches
    fb = get_forward_backward_func()
    result = UpdateResult()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.inputs, mb.position_ids, None)

        def loss_func(logits):
            loss_sum, n_tok, sums = objective.loss(logits, teacher.for_micro_batch(mb), old_log_probs[mb.index],
                                                   mb.loss_mask)
            for k, v in sums.items():
                result.sums[k] = result.sums[k] + v if k in result.sums else v
            return loss_sum, n_tok.to(torch.int), {}

        return out, loss_func

    for step in range(mini_batches):
        group = micro_batches[step * per_step:(step + 1) * per_step]
        student.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter(group), model=student.chunks, num_microbatches=len(group),
           seq_length=group[0].inputs.shape[1], micro_batch_size=group[0].inputs.shape[0], forward_only=False)
        taken, grad_norm = student.step()
        result.steps_taken += int(taken)
        if grad_norm is not None:
            result.grad_norms.append(grad_norm)
    student.sync_params()
    result.lr = student.lr
    return result


def counts_once() -> bool:
    """True on the ranks whose per-micro-batch numbers count in a sum over the world: TP rank 0 of the
    last pipeline stage (TP peers hold identical numbers; earlier stages hold none)."""
    return ps.get_tensor_model_parallel_rank() == 0 and is_last_stage()


def rollout_sums(batch: RolloutBatch, correct: Sequence[bool] | None) -> dict[str, float]:
    """This rank's rollout statistics as sums: rows, response tokens, finished rows, graded and correct rows.

    Args:
        batch: the rank's rollouts.
        correct: per row, whether the boxed answer was graded correct (None: not graded on this rank).
    """
    return {
        "rows": float(batch.tokens.shape[0]),
        "response_tokens": float(batch.response_lengths.sum()),
        "finished_rows": float(batch.finished.sum()),
        "graded_rows": float(len(correct)) if correct is not None else 0.0,
        "correct_rows": float(sum(bool(c) for c in correct)) if correct is not None else 0.0,
    }


def reduce_rollout_sums(s: dict[str, float]) -> dict[str, float]:
    """World sums of :func:`rollout_sums` -> ``response_length`` (tokens per rollout),
    ``finished_fraction`` and ``rollout_accuracy`` (fractions)."""
    return {
        "response_length": s["response_tokens"] / max(s["rows"], 1.0),
        "finished_fraction": s["finished_rows"] / max(s["rows"], 1.0),
        "rollout_accuracy": s["correct_rows"] / max(s["graded_rows"], 1.0),
    }
