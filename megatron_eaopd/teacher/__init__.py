"""The frozen teacher: its process groups, the exchanges between its layout and the student's, the scoring phase.

* :mod:`.groups`: the teacher's own TP/PP/DP groups (megatron-core ``HyperCommGrid`` /
  ``ProcessGroupCollection``) and the rank arithmetic of both layouts;
* :mod:`.exchange`: the union of sequences a teacher replica scores, per-row results routed to the
  student ranks that own them, the output-layer rows of each student vocabulary shard;
* :mod:`.scoring`: :class:`Teacher` (the teacher phase) and :class:`TeacherScores` (per micro-batch);
* :mod:`.build`: the shared vocabulary of a pair and :func:`build_teacher` for a run.
"""

from megatron_eaopd.teacher.scoring import Teacher, TeacherScores

__all__ = ["Teacher", "TeacherScores"]
