"""The frozen teacher: serves the objective what it asks for, per micro-batch of the student's rollouts.

The teacher is a Megatron ``GPTModel``, frozen (no gradients, eval mode), in the student's TP/PP layout
(global process groups) or in its own (:mod:`megatron_eaopd.teacher.groups`). :meth:`Teacher.score`
returns :class:`TeacherScores`, whose ``for_micro_batch(mb)`` gives the
:class:`~megatron_eaopd.loss.TeacherSignals` of that micro-batch. In the teacher phase each teacher replica
runs forward-only (across its pipeline stages) over the union of the sequences of the student DP ranks it
serves (:func:`~megatron_eaopd.teacher.exchange.gather_union`), then, by the objective's payload:

* ``"signals"`` (mode topk): on its last stage the vocab-parallel logits become signals (target
  log-prob, full-vocabulary entropy, top-k: ``[B, S, k]``) with the TEACHER's TP group, and each
  micro-batch's signals go to the student last-stage ranks that own those rows;
* ``"logits"`` (mode full): the final hidden states ``[B, S, H]`` (after the final norm, before the
  output layer) go to the owners instead and are staged in (pinned) host memory; each student
  last-stage rank holds the teacher's output-layer rows of ITS vocabulary shard (received once, at
  construction), and ``for_micro_batch`` computes that micro-batch's teacher logits
  ``hidden @ W_shard^T`` on the student's shards, in the teacher's dtype, when the update step asks;
  they are freed with the step. Only one micro-batch's hidden states and logits are on the device at a
  time, at any layout and pipeline depth.

``offload=True`` (GPU) keeps the weights in pinned host memory between phases: the host copy is made
once (the teacher never changes), offloading only drops the device tensors, and loading back is a
non-blocking copy from pinned memory.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_eaopd.distributed import unwrap
from megatron_eaopd.loss import Objective, TeacherSignals
from megatron_eaopd.pipeline import MicroBatch, forward_only
from megatron_eaopd.teacher.exchange import gather_union, output_rows_for_student_shard, route_plan, route_to_owners
from megatron_eaopd.teacher.groups import TeacherGroups, build_teacher_groups

__all__ = ["Teacher", "TeacherScores"]

#: TeacherSignals fields that travel from the teacher to the student (the targets are the student's own).
_SIGNAL_FIELDS = tuple(f.name for f in fields(TeacherSignals) if f.name not in ("target_ids", "logits"))


class TeacherScores:
    """The teacher's contribution to one iteration, looked up per micro-batch.

    Args:
        signals: precomputed signals by micro-batch index (payload ``"signals"``; empty on ranks
            outside the student's last pipeline stage), or None.
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


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of ``t`` (pinned with CUDA, so the copy back is asynchronous); ``t`` itself when
    it already is one."""
    pinned = torch.cuda.is_available()
    if t.device.type == "cpu" and t.is_contiguous() and (not pinned or t.is_pinned()):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
    return out.copy_(t, non_blocking=torch.cuda.is_available())


class Teacher:
    """Frozen teacher model chunks and the scoring phase.

    Args:
        model_chunks: built by :func:`megatron_eaopd.models.provider.build_gpt_model` on ``groups``'
            process groups (the global ones at the student's layout), weights loaded.
        objective: the :class:`~megatron_eaopd.loss.Objective` whose ``teacher_payload`` and
            ``teacher_signals`` decide what scoring produces.
        offload: keep weights in pinned host memory between phases (GPU only; ignored on CPU).
        groups: the teacher's :class:`~megatron_eaopd.teacher.groups.TeacherGroups`; default: the
            student's layout.
        student_padded_vocab: the student's padded vocabulary (payload ``"logits"``: the rows the teacher's
            output layer is re-cut into); default: the teacher's own.
        seq_multiple: the teacher's input width is padded to a multiple of this (its TP under sequence
            parallelism) when it scores other ranks' sequences.
    Attributes:
        groups: the :class:`~megatron_eaopd.teacher.groups.TeacherGroups` in use.
        head: payload ``"logits"``, on the student's last stage: ``[V_s / TP_s, H]`` the teacher's output
            rows of this rank's student vocabulary shard (the teacher's own weight when it is exactly
            that, else a copy; the embedding when tied). head_bytes_received: what building it received.
        stats: of the last :meth:`score` on this rank: ``union_rows`` / ``union_tokens`` (what its replica
            scored), ``token_bytes_received`` (union gather), ``payload_bytes_sent`` /
            ``payload_bytes_received`` (signals or hidden states routed to owners),
            ``payload_host_bytes`` (hidden states held on the host for the update), ``time_forward`` /
            ``time_exchange`` (seconds).
    Collective (payload ``"logits"``): construction moves the output-layer rows within each replica.
    """

    def __init__(self, model_chunks: list, objective: Objective, offload: bool = False, *,
                 groups: TeacherGroups | None = None, student_padded_vocab: int | None = None, seq_multiple: int = 1):
        self.model_chunks = model_chunks
        self.objective = objective
        self._groups = groups
        self.seq_multiple = seq_multiple
        self.offload = offload and torch.cuda.is_available()
        self._host: list[torch.Tensor] = []
        self.head: torch.Tensor | None = None
        self.head_bytes_received = 0
        self.stats: dict[str, float] = {}
        for m in model_chunks:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        if objective.teacher_payload == "logits" and model_chunks:
            self.head, self.head_bytes_received = self._output_rows(student_padded_vocab)
        if self.offload:
            self._host = [p.detach().to("cpu").pin_memory() for p in self._params()]
            self._release()

    @property
    def groups(self) -> TeacherGroups:
        """The teacher's groups (default, built on first use: the student's layout, global process groups)."""
        if self._groups is None:
            self._groups = build_teacher_groups(ps.get_tensor_model_parallel_world_size(),
                                                ps.get_pipeline_model_parallel_world_size())
        return self._groups

    def _output_rows(self, student_padded_vocab: int | None) -> tuple[torch.Tensor | None, int]:
        m = unwrap(self.model_chunks[0])
        weight = None
        if self.groups.is_last_stage:
            weight = m.output_layer.weight if m.output_layer.weight is not None else m.shared_embedding_or_output_weight()
        return output_rows_for_student_shard(
            self.groups, weight, int(m.vocab_size), int(student_padded_vocab or m.vocab_size), m.config.hidden_size,
            self._dtype, reuse=not self.offload)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.model_chunks for p in m.parameters()]

    def _release(self) -> None:
        for p, h in zip(self._params(), self._host):
            p.data = h  # the device copy is dropped; the pinned host copy is the parameter meanwhile

    def _acquire(self) -> None:
        dev = torch.cuda.current_device()
        for p, h in zip(self._params(), self._host):
            p.data = torch.empty_like(h, device=dev).copy_(h, non_blocking=True)

    def _hidden_states(self, *, hidden_states: torch.Tensor, **_) -> torch.Tensor:
        """megatron-core's ``output_processor`` hook: the final hidden states ``[b, s, H]`` instead of logits
        (gathered over the teacher's TP group under sequence parallelism)."""
        if unwrap(self.model_chunks[0]).config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=self.groups.tp_group)
        return hidden_states.transpose(0, 1).contiguous()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[mb, S, V_s / TP_s]`` on this rank's student vocabulary shard (teacher dtype)."""
        dev = self.head.device
        return torch.matmul(hidden.to(dev, non_blocking=True), self.head.t())

    @torch.no_grad()
    def score(self, micro_batches: list[MicroBatch]) -> TeacherScores:
        """The teacher phase: what the objective needs for every micro-batch (collective over the world:
        every rank calls it with its own student micro-batches).

        Returns:
            :class:`TeacherScores`: payload ``"signals"``: computed now, held on the student's last
            pipeline stage; payload ``"logits"``: hidden states held on the host of the student's last
            stage, logits computed per micro-batch on demand.
        """
        g, full = self.groups, self.objective.teacher_payload == "logits"
        plan = route_plan(g)
        self.stats = {"union_rows": 0.0, "union_tokens": 0.0, "token_bytes_received": 0.0, "payload_bytes_sent": 0.0,
                      "payload_bytes_received": 0.0, "payload_host_bytes": 0.0, "time_forward": 0.0,
                      "time_exchange": 0.0}
        if not plan.sources:  # no member of this replica computes the student's loss: nothing to score
            return TeacherScores(signals={})
        t0 = time.perf_counter()
        union = gather_union(g, micro_batches, plan, seq_multiple=self.seq_multiple)
        n = len(micro_batches)
        keep = {union.teacher_mb(d, i) for d in plan.kept_dp_ranks(g, g.rank) for i in range(n)} \
            if g.is_last_stage else set()
        payload: dict[int, dict[str, torch.Tensor]] = {}
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

        def on_output(tmb: MicroBatch, out: torch.Tensor) -> None:
            if full:
                if tmb.index in keep:
                    payload[tmb.index] = {"hidden": _host(out)}
                return
            sig = self.objective.teacher_signals(out, tmb.targets, group=g.tp_group)  # collective over teacher TP
            fields_ = {k: v for k in _SIGNAL_FIELDS if (v := getattr(sig, k)) is not None}  # optional ones may be None
            shapes.update({k: (tuple(v.shape[2:]), v.dtype) for k, v in fields_.items()})
            if tmb.index in keep:
                payload[tmb.index] = fields_

        t1 = time.perf_counter()
        if self.offload:
            self._acquire()
        try:
            forward_only(self.model_chunks, union.micro_batches, on_output, pg_collection=g.pg_collection,
                         output_processor=self._hidden_states if full else None)
        finally:
            if self.offload:
                self._release()
                torch.cuda.empty_cache()
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the pinned host copies are read on the host below
        t2 = time.perf_counter()
        if full:
            spec = {"hidden": ((unwrap(self.model_chunks[0]).config.hidden_size,), self._dtype)}
        else:  # receivers off the teacher's last stage learn the shapes from its first rank
            box = [shapes]
            if plan.remote:
                dist.broadcast_object_list(box, src=g.last_stage_ranks[0], group=g.mp_group)
            spec = box[0]
        mine: dict[int, dict[str, torch.Tensor]] = {}

        def store(i: int, tensors: dict[str, torch.Tensor]) -> None:
            mine[i] = {k: _host(v) for k, v in tensors.items()} if full else tensors

        sent, got = route_to_owners(g, plan, union, payload, spec, n, store)
        del payload
        tokens = sum(mb.inputs.numel() for mb in union.micro_batches)
        self.stats.update(union_rows=float(len(union.micro_batches) * union.micro_batch_size), union_tokens=float(tokens),
                          token_bytes_received=float(union.bytes_received), payload_bytes_sent=float(sent),
                          payload_bytes_received=float(got), time_forward=t2 - t1,
                          time_exchange=(t1 - t0) + (time.perf_counter() - t2),
                          payload_host_bytes=float(sum(t.numel() * t.element_size() for d in mine.values()
                                                       for t in d.values())) if full else 0.0)
        if full:
            hidden = {mb.index: mine[i]["hidden"] for i, mb in enumerate(micro_batches) if i in mine}
            return TeacherScores(compute=lambda mb: self.objective.teacher_signals(self._logits(hidden[mb.index]),
                                                                                   mb.targets))
        out = {}
        for i, mb in enumerate(micro_batches):
            if i in mine:
                dev = mb.targets.device
                out[mb.index] = TeacherSignals(target_ids=mb.targets, **{k: v.to(dev) for k, v in mine[i].items()})
        return TeacherScores(signals=out)

    @property
    def _dtype(self) -> torch.dtype:
        return next(unwrap(self.model_chunks[0]).parameters()).dtype
