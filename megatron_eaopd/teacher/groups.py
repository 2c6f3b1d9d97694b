"""The teacher's own process groups, and where every rank sits in the student's and the teacher's layouts.

Student and teacher are colocated: every rank of the world holds a piece of both models. The student
uses Megatron's global ``parallel_state`` (order ``tp-cp-ep-dp-pp``); the teacher, when its TP/PP
differs, gets its own groups from megatron-core's ``HyperCommGrid`` (dims ``tp, cp, dp, pp`` in that
order) gathered into a ``ProcessGroupCollection`` that its ``GPTModel`` takes as ``pg_collection``.
Both orders give the same rank arithmetic (CP = EP = 1)::

    global rank = tp_rank + TP * dp_rank + TP * DP * pp_rank           (:func:`grid_coords` inverts it)

so TP peers are adjacent ranks (one node for TP <= 8 GPUs per node) and pipeline stages are the
slowest-varying index. Example, 2 ranks: student TP=1 DP=2 (rank r is student DP rank r) with teacher
TP=2 DP=1 (ranks 0 and 1 are the two TP shards of one teacher replica, which scores the sequences of
both student DP ranks). :func:`build_teacher_groups` checks this arithmetic against the groups the
grid and ``parallel_state`` actually built, so a change of order in megatron-core fails loudly.

A *replica* is one full copy of the teacher: its TP x PP ranks (the teacher's model-parallel group).
It serves the student DP ranks of its own member ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

__all__ = ["GridLayout", "grid_coords", "TeacherGroups", "build_teacher_groups"]


def grid_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """``(tp_rank, dp_rank, pp_rank)`` of global ``rank`` in a ``tp x dp x pp`` grid (order tp-dp-pp).

    Raises:
        ValueError: ``rank`` outside ``[0, tp * pp * dp)``.
    """
    if not 0 <= rank < tp * pp * dp:
        raise ValueError(f"rank {rank} is outside a world of tp {tp} x pp {pp} x dp {dp}")
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


@dataclass(frozen=True)
class GridLayout:
    """Sizes of one model's layout over the world (DP = world / (TP x PP))."""

    tp: int
    pp: int
    dp: int

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of ``rank`` (see :func:`grid_coords`)."""
        return grid_coords(rank, self.tp, self.pp, self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """The global rank at these coordinates."""
        return tp_rank + self.tp * dp_rank + self.tp * self.dp * pp_rank

    def replica(self, rank: int) -> tuple[int, ...]:
        """Global ranks of ``rank``'s model replica (same DP rank), ordered by (pp_rank, tp_rank)."""
        _, d, _ = self.coords(rank)
        return tuple(self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp))


@dataclass
class TeacherGroups:
    """This rank's place in the teacher's layout, and the student's layout it serves.

    Attributes:
        teacher, student: the two :class:`GridLayout`.
        rank: this process's global rank.
        pg_collection: the teacher's ``ProcessGroupCollection`` (``tp``, ``cp``, ``pp``, ``dp``,
            ``dp_cp``, ``mp``; ``embd`` None: the frozen teacher's tied output copy at PP > 1 comes from
            the checkpoint, not from a start-up all-reduce), or None when the layouts are equal (the
            teacher then uses the global ``parallel_state``, as the student does).
        tp_group, pp_group, mp_group, dp_cp_group: the teacher's groups (the global ones when equal).
    """

    teacher: GridLayout
    student: GridLayout
    rank: int
    pg_collection: ProcessGroupCollection | None
    tp_group: object
    pp_group: object
    mp_group: object
    dp_cp_group: object

    @property
    def same_layout(self) -> bool:
        """True when the teacher runs in the student's layout (global process groups)."""
        return self.pg_collection is None

    @property
    def tp_rank(self) -> int:
        return self.teacher.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.teacher.coords(self.rank)[2]

    @property
    def is_last_stage(self) -> bool:
        """True on the teacher's last pipeline stage."""
        return self.pp_rank == self.teacher.pp - 1

    @property
    def replica(self) -> tuple[int, ...]:
        """Global ranks of this rank's teacher replica, ordered by (pp_rank, tp_rank)."""
        return self.teacher.replica(self.rank)

    @property
    def last_stage_ranks(self) -> tuple[int, ...]:
        """The replica's last-stage ranks in teacher TP order (they hold its logits / hidden states)."""
        return self.replica[-self.teacher.tp:]

    def student_dp(self, rank: int) -> int:
        """The student DP rank of global ``rank`` (whose sequences it rolls out and trains on)."""
        return self.student.coords(rank)[1]

    def student_tp(self, rank: int) -> int:
        """The student TP rank of global ``rank``."""
        return self.student.coords(rank)[0]

    def student_last(self, rank: int) -> bool:
        """True when global ``rank`` is on the student's last pipeline stage (it computes the loss)."""
        return self.student.coords(rank)[2] == self.student.pp - 1

    def served_dp_ranks(self) -> tuple[int, ...]:
        """Student DP ranks whose sequences this replica scores (sorted, distinct)."""
        return tuple(sorted({self.student_dp(r) for r in self.replica}))


def _student_layout(world: int) -> GridLayout:
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    return GridLayout(tp, pp, world // (tp * pp))


def _check(name: str, group, want: tuple[int, ...]) -> None:
    got = tuple(dist.get_process_group_ranks(group))
    if tuple(sorted(got)) != tuple(sorted(want)):
        raise RuntimeError(f"the {name} group holds ranks {got}, but the rank arithmetic of megatron_eaopd.teacher.groups "
                           f"expects {want}; megatron-core changed its rank order")


def build_teacher_groups(tp: int, pp: int) -> TeacherGroups:
    """The teacher's process groups for TP ``tp`` x PP ``pp`` over the whole world (collective: every rank
    calls it, in the same order). With the student's TP/PP the global groups are reused and nothing is
    created.

    Needs ``torch.distributed`` and Megatron's ``parallel_state`` (the student's) initialised.

    Raises:
        ValueError: ``tp * pp`` does not divide the world size (names ``parallel.teacher_tp/teacher_pp``).
        RuntimeError: the built groups do not follow the documented rank arithmetic.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"parallel.teacher_tp x parallel.teacher_pp = {tp} x {pp} must divide the world size {world}")
    student = _student_layout(world)
    teacher = GridLayout(tp, pp, world // (tp * pp))
    s_tp, s_dp, s_pp = student.coords(rank)
    if (s_tp, s_dp, s_pp) != (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                              ps.get_pipeline_model_parallel_rank()):
        raise RuntimeError(f"rank {rank}: parallel_state places it at (tp, dp, pp) = "
                           f"({ps.get_tensor_model_parallel_rank()}, {ps.get_data_parallel_rank()}, "
                           f"{ps.get_pipeline_model_parallel_rank()}), the rank arithmetic at {(s_tp, s_dp, s_pp)}")
    if (tp, pp) == (student.tp, student.pp):
        return TeacherGroups(teacher, student, rank, None, ps.get_tensor_model_parallel_group(),
                             ps.get_pipeline_model_parallel_group(), ps.get_model_parallel_group(),
                             ps.get_data_parallel_group(with_context_parallel=True))
    grid = HyperCommGrid([tp, 1, teacher.dp, pp], ["tp", "cp", "dp", "pp"])
    pgc = ProcessGroupCollection()
    pgc.tp, pgc.cp, pgc.pp, pgc.dp = grid.create_pg("tp"), grid.create_pg("cp"), grid.create_pg("pp"), grid.create_pg("dp")
    pgc.dp_cp = grid.create_pg(["cp", "dp"])
    pgc.mp = grid.create_pg(["tp", "pp"])
    pgc.embd = None
    pgc.pos_embd = None
    t_tp, t_dp, t_pp = teacher.coords(rank)
    _check("teacher tp", pgc.tp, tuple(teacher.rank(t, t_dp, t_pp) for t in range(tp)))
    _check("teacher pp", pgc.pp, tuple(teacher.rank(t_tp, t_dp, p) for p in range(pp)))
    _check("teacher dp", pgc.dp, tuple(teacher.rank(t_tp, d, t_pp) for d in range(teacher.dp)))
    _check("teacher mp", pgc.mp, teacher.replica(rank))
    return TeacherGroups(teacher, student, rank, pgc, pgc.tp, pgc.pp, pgc.mp, pgc.dp_cp)
