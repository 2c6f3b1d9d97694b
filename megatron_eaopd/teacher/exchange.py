"""Moving sequences to the teacher and its results back, between the student's and the teacher's layouts.

Three exchanges, each inside one teacher replica (its TP x PP ranks, :mod:`megatron_eaopd.teacher.groups`):

* :func:`gather_union`: every member brings its student DP rank's sequences; the replica scores their
  union (one block per distinct student DP rank, in DP order, right-padded to one width; a causal
  model's outputs at the real positions do not depend on the padding). Skipped when every member
  belongs to the same student DP rank (then the union is the rank's own micro-batches, unchanged).
* :func:`route_to_owners`: per-row results on the teacher's last stage (signals ``[mb, S, ...]`` or
  hidden states ``[mb, S, H]``) go to the members on the student's last stage that own those rows,
  one micro-batch per round (at most one micro-batch per receiver in flight).
* :func:`output_rows_for_student_shard`: once, the rows of the teacher's output layer that fall in each
  student last-stage rank's vocabulary shard (the teacher's TP shards re-cut into the student's).

Point-to-point messages use global ranks on the default group (``isend``/``irecv``), tensors on
:func:`megatron_eaopd.distributed.collective_device`. Every member computes the same plan from the two
layouts and the exchanged widths, so sends and receives pair up without further messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from megatron_eaopd.distributed import collective_device
from megatron_eaopd.pipeline import MicroBatch, padded_length, split_micro_batches
from megatron_eaopd.teacher.groups import TeacherGroups

__all__ = ["Union", "gather_union", "RoutePlan", "route_plan", "route_to_owners", "output_rows_for_student_shard"]


@dataclass
class Union:
    """The sequences one teacher replica scores.

    Attributes:
        dp_ranks: the student DP ranks served, in block order.
        rows: sequences per block (every student DP rank has the same number).
        widths: student DP rank -> its model-input width ``S_d - 1`` (its micro-batches' width).
        micro_batches: the teacher's micro-batches over the union (``micro_batch_size`` rows each, block
            by block: micro-batch ``i`` of block ``j`` is teacher micro-batch ``j * rows / mbs + i``).
        micro_batch_size: rows per micro-batch.
        bytes_received: token bytes this rank received to build it (0 when it is the rank's own batch).
    """

    dp_ranks: tuple[int, ...]
    rows: int
    widths: dict[int, int]
    micro_batches: list[MicroBatch]
    micro_batch_size: int
    bytes_received: int = 0

    def teacher_mb(self, dp_rank: int, i: int) -> int:
        """Index of the teacher micro-batch that holds micro-batch ``i`` of student DP rank ``dp_rank``."""
        return self.dp_ranks.index(dp_rank) * (self.rows // self.micro_batch_size) + i


def _tokens(micro_batches: list[MicroBatch]) -> torch.Tensor:
    """``[B, W + 1]`` token ids of a rank's micro-batches (inputs plus the last target)."""
    return torch.cat([torch.cat([mb.inputs, mb.targets[:, -1:]], dim=1) for mb in micro_batches])


def gather_union(groups: TeacherGroups, micro_batches: list[MicroBatch], plan: "RoutePlan", *,
                 seq_multiple: int = 1) -> Union:
    """The union of the sequences of the student DP ranks the replica serves (collective over the teacher's
    model-parallel group).

    Args:
        groups: the teacher's groups.
        micro_batches: this rank's student micro-batches (equal shapes, ``[mb, W]``).
        plan: the replica's :class:`RoutePlan` (which DP ranks it serves).
        seq_multiple: the teacher's input width is padded to a multiple of this (teacher TP under
            sequence parallelism).
    Returns:
        :class:`Union` (the same on every member).
    Raises:
        ValueError: members hold different numbers of sequences or micro-batch sizes.
    """
    if not micro_batches:
        raise ValueError("the teacher phase got no micro-batches")
    mbs, width = micro_batches[0].inputs.shape
    rows = mbs * len(micro_batches)
    me = groups.student_dp(groups.rank)
    served = plan.served(groups)
    if served == (me,) and groups.served_dp_ranks() == (me,) and width % seq_multiple == 0:
        return Union((me,), rows, {me: width}, micro_batches, mbs)
    tokens = _tokens(micro_batches)
    dev = collective_device(groups.mp_group)
    n = len(groups.replica)
    meta = torch.tensor([rows, width, mbs, me], dtype=torch.long, device=dev)
    metas = [torch.empty_like(meta) for _ in range(n)]
    dist.all_gather(metas, meta, group=groups.mp_group)
    metas = [m.tolist() for m in metas]
    if len({(m[0], m[2]) for m in metas}) != 1:
        raise ValueError(f"the ranks of teacher replica {groups.replica} hold different batches (rows, micro-batch "
                         f"size) = {[(m[0], m[2]) for m in metas]}; every student DP rank must roll out as many sequences")
    w_all = max(m[1] for m in metas)
    mine = torch.cat([tokens, tokens[:, -1:].expand(rows, w_all - width)], dim=1).to(dev)
    allt = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(allt, mine, group=groups.mp_group)
    first = {}
    for m, t in zip(metas, allt):
        if m[3] in served:
            first.setdefault(m[3], (m[1], t))
    order = served
    w_max = max(first[d][0] for d in order)
    wu = padded_length(w_max, seq_multiple)
    blocks = []
    for d in order:
        t = first[d][1][:, :w_max + 1].to(micro_batches[0].inputs.device)
        blocks.append(torch.cat([t, t[:, -1:].expand(rows, wu - w_max)], dim=1) if wu > w_max else t)
    union = torch.cat(blocks)
    mask = torch.zeros(union.shape[0], wu, dtype=torch.bool)
    tmbs = split_micro_batches(union, mask, mbs, micro_batches[0].inputs.device)
    got = sum(t.numel() * t.element_size() for t in allt) - mine.numel() * mine.element_size()
    return Union(order, rows, {d: first[d][0] for d in order}, tmbs, mbs, got)


@dataclass(frozen=True)
class RoutePlan:
    """Who receives which rows from whom, in one replica.

    Attributes:
        sources: receiving member (on the student's last stage) -> the teacher last-stage rank that
            sends its rows (itself when it is on the teacher's last stage; else spread round-robin over
            the last stage's TP ranks).
    """

    sources: dict[int, int]

    def served(self, groups: TeacherGroups) -> tuple[int, ...]:
        """The student DP ranks whose sequences the replica scores: those of its members on the student's
        last stage (sorted; empty when none of its members computes the loss)."""
        return tuple(sorted({groups.student_dp(r) for r in self.sources}))

    def kept_dp_ranks(self, groups: TeacherGroups, rank: int) -> set[int]:
        """Student DP ranks whose rows ``rank`` (a teacher last-stage rank) must keep to serve."""
        return {groups.student_dp(r) for r, s in self.sources.items() if s == rank}

    @property
    def remote(self) -> bool:
        """True when some rows travel between ranks."""
        return any(r != s for r, s in self.sources.items())


def route_plan(groups: TeacherGroups) -> RoutePlan:
    """The :class:`RoutePlan` of this rank's replica (the same on every member; no communication)."""
    last = groups.last_stage_ranks
    needers = [r for r in groups.replica if groups.student_last(r)]
    others = [r for r in needers if r not in last]
    sources = {r: r for r in needers if r in last}
    sources.update({r: last[i % len(last)] for i, r in enumerate(others)})
    return RoutePlan(sources)


def route_to_owners(groups: TeacherGroups, plan: RoutePlan, union: Union, payload: Mapping[int, Mapping[str, torch.Tensor]],
                    spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], num_micro_batches: int,
                    store: Callable[[int, dict[str, torch.Tensor]], None]) -> tuple[int, int]:
    """Hand each receiving member its rows of the teacher's per-row results, one micro-batch per round.

    Args:
        groups, plan, union: the replica's groups, :func:`route_plan` and :func:`gather_union`.
        payload: on a sending rank, teacher micro-batch index -> name -> ``[mb, W_union, *trailing]``
            (device or host); only the micro-batches this rank serves need to be present.
        spec: name -> (trailing shape, dtype), the same on every member.
        num_micro_batches: micro-batches per student DP rank.
        store: called on a receiving rank as ``store(i, {name: [mb, W_own, *trailing]})`` for its
            micro-batch ``i`` (tensors on the collective device, or host views when local).
    Returns:
        ``(bytes sent, bytes received)`` by this rank.
    """
    rank = groups.rank
    dev = collective_device()
    sent = got = 0
    for i in range(num_micro_batches):
        ops, received = [], {}
        for dst, src in sorted(plan.sources.items()):
            if rank not in (dst, src):
                continue
            d = groups.student_dp(dst)
            w = union.widths[d]
            if dst == src:
                store(i, {k: v[:, :w] for k, v in payload[union.teacher_mb(d, i)].items()})
                continue
            for name, (trailing, dtype) in spec.items():
                if rank == src:
                    t = payload[union.teacher_mb(d, i)][name][:, :w].to(dev).contiguous()
                    ops.append(dist.P2POp(dist.isend, t, dst))
                    sent += t.numel() * t.element_size()
                else:
                    buf = torch.empty((union.micro_batch_size, w, *trailing), dtype=dtype, device=dev)
                    received[name] = buf
                    ops.append(dist.P2POp(dist.irecv, buf, src))
                    got += buf.numel() * buf.element_size()
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if received:
            store(i, received)
    return sent, got


@torch.no_grad()
def output_rows_for_student_shard(groups: TeacherGroups, weight: torch.Tensor | None, teacher_padded_vocab: int,
                                  student_padded_vocab: int, hidden: int, dtype: torch.dtype,
                                  chunk_rows: int = 16384, reuse: bool = True) -> tuple[torch.Tensor | None, int]:
    """The teacher output-layer rows of this rank's student vocabulary shard (collective within the replica).

    The student's TP rank ``j`` holds vocabulary rows ``[j * V_s / TP_s, (j + 1) * V_s / TP_s)`` of its
    padded vocabulary ``V_s``; the teacher's last-stage TP rank ``t`` holds rows ``[t * V_t / TP_t, ...)``
    of ``V_t``. Each student last-stage rank receives the overlapping pieces from its replica's
    last stage, in chunks of at most ``chunk_rows`` rows sent straight from the teacher's weight (views,
    no copy on the sender). Rows at or beyond ``V_t`` are zero (padding: the loss masks them).

    Args:
        groups: the teacher's groups.
        weight: ``[V_t / TP_t, H]`` the teacher's output weight shard on its last stage (the embedding
            when tied), None elsewhere.
        teacher_padded_vocab, student_padded_vocab: ``V_t``, ``V_s``.
        hidden: the teacher's hidden size ``H``. dtype: the teacher's parameter dtype.
        chunk_rows: rows per message.
        reuse: return ``weight`` itself when it is exactly the rows needed (same layout, not offloaded).
    Returns:
        ``([V_s / TP_s, H] on the collective device on the student's last stage, else None; bytes received)``.
    """
    s_tp, t_tp = groups.student.tp, groups.teacher.tp
    vs, vt = student_padded_vocab // s_tp, teacher_padded_vocab // t_tp
    last = groups.last_stage_ranks
    rank, dev = groups.rank, collective_device()
    out, reused = None, False
    if groups.student_last(rank):
        j = groups.student_tp(rank)
        reused = (reuse and rank in last and weight is not None and vs == vt and last.index(rank) == j
                  and weight.device.type == torch.device(dev).type)
        out = weight.detach() if reused else torch.zeros(vs, hidden, dtype=dtype, device=dev)
    pieces = []  # (src, dst, rows lo..hi in the student's padded vocabulary)
    for dst in groups.replica:
        if not groups.student_last(dst):
            continue
        a = groups.student_tp(dst) * vs
        for t, src in enumerate(last):
            lo, hi = max(a, t * vt), min(a + vs, (t + 1) * vt)
            for c in range(lo, hi, chunk_rows):
                pieces.append((src, dst, c, min(c + chunk_rows, hi), a, t * vt))
    got = 0
    for src, dst, lo, hi, a, t0 in pieces:
        if rank == src == dst:
            if not reused:
                out[lo - a:hi - a].copy_(weight[lo - t0:hi - t0])
        elif rank == src:
            dist.isend(weight[lo - t0:hi - t0].to(dev).contiguous(), dst).wait()
        elif rank == dst:
            dist.irecv(out[lo - a:hi - a], src).wait()
            got += (hi - lo) * hidden * out.element_size()
    return out, got
