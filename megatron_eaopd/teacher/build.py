"""Building the teacher for a run: its vocabulary against the student's, its process groups, its model and weights.

* :func:`shared_vocab_size`: the vocabulary both models are compared over. Equal logit widths: the
  student's true vocabulary, as always. Different widths with the same tokenizer (Qwen2.5-7B has
  152,064 output rows, Qwen2.5-1.5B 151,936; both tokenizers map the same 151,665 tokens): the
  tokenizer's vocabulary, and both models' rows beyond it are masked as padding. A different
  tokenizer is an error (the two distributions would be over different tokens).
* :func:`build_teacher`: the groups (:func:`~megatron_eaopd.teacher.groups.build_teacher_groups`), the
  ``GPTModel`` on them, its weights at its own layout (``torch_dist`` reshards a checkpoint on load; an
  HF folder is cut to the teacher's TP rank), and the :class:`~megatron_eaopd.teacher.scoring.Teacher`.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from megatron_eaopd.checkpoint import load_checkpoint
from megatron_eaopd.settings import ConfigError
from megatron_eaopd.distributed import print_rank0
from megatron_eaopd.loss import Objective
from megatron_eaopd.models.convert import load_hf_weights
from megatron_eaopd.models.provider import ModelInfo, build_gpt_model
from megatron_eaopd.teacher.groups import build_teacher_groups
from megatron_eaopd.teacher.scoring import Teacher

__all__ = ["shared_vocab_size", "build_teacher"]


def shared_vocab_size(student_rows: int, teacher_rows: int, student_vocab: Mapping[str, int] | None,
                      teacher_vocab: Mapping[str, int] | None, *, override: int | None = None,
                      added: Iterable[str] = (), names: tuple[str, str] = ("student", "teacher")) -> int:
    """The vocabulary size the objective and the sampler use for a student/teacher pair.

    Args:
        student_rows, teacher_rows: each model's true vocabulary (HF ``vocab_size``: its logit width
            before Megatron's padding).
        student_vocab, teacher_vocab: each tokenizer's token -> id map (``tokenizer.get_vocab()``,
            added tokens included), or None when a model ships no tokenizer.
        override: ``loss.vocab_size`` from the configuration, if set.
        added: tokens that may differ between the two maps (the tokenizers' added / special tokens:
            a base model and its instruct sibling may name a few reserved ids differently); a
            difference there is reported, not refused.
        names: how the two sources are named in messages (e.g. their paths).
    Returns:
        ``override`` if given, else ``student_rows`` when the widths are equal, else the student
        tokenizer's size (``max id + 1``).
    Raises:
        ConfigError: the tokenizers map regular tokens to different ids; the widths differ and a
            tokenizer is missing (the pair cannot be checked); the shared vocabulary does not fit both
            models' rows.
    """
    if student_vocab is not None and teacher_vocab is not None:
        diff = sorted((k for k in set(student_vocab) | set(teacher_vocab) if student_vocab.get(k) != teacher_vocab.get(k)),
                      key=lambda k: (student_vocab.get(k, -1), k))
        regular = [k for k in diff if k not in set(added)]
        show = lambda ks: ", ".join(f"{k!r}: {student_vocab.get(k)} vs {teacher_vocab.get(k)}" for k in ks[:3])  # noqa: E731
        if regular:
            raise ConfigError(
                f"config error at teacher: the {names[0]} and {names[1]} tokenizers differ ({len(student_vocab)} vs "
                f"{len(teacher_vocab)} tokens; {len(regular)} regular tokens map to other ids, e.g. {show(regular)}); "
                f"EOPD compares the two next-token distributions id by id, so the teacher must use the student's "
                f"tokenizer")
        if diff:
            print_rank0(f"[eopd] note: the {names[0]} and {names[1]} tokenizers differ in {len(diff)} added/special "
                        f"token(s) ({show(diff)}); their regular tokens agree")
    if override is None and student_rows == teacher_rows:
        return int(student_rows)
    if override is None and (student_vocab is None or teacher_vocab is None):
        raise ConfigError(
            f"config error at teacher: the {names[0]} has {student_rows} output rows and the {names[1]} "
            f"{teacher_rows}, and without both tokenizers it cannot be checked that they share one; ship the "
            f"tokenizer files with both models (or set loss.vocab_size to the shared tokenizer's size)")
    shared = int(override) if override is not None else max(student_vocab.values()) + 1
    if shared > min(student_rows, teacher_rows):
        raise ConfigError(
            f"config error at loss.vocab_size: the shared vocabulary ({shared} tokens) exceeds the "
            f"{names[0]}'s {student_rows} or the {names[1]}'s {teacher_rows} output rows")
    return shared


def build_teacher(source, assets: str, objective: Objective, *, tp: int, pp: int, params_dtype: torch.dtype,
                  student_info: ModelInfo, sequence_parallel: bool = False, seq_multiple: int = 1,
                  offload: bool = False) -> Teacher:
    """Build, load and wrap the frozen teacher at TP ``tp`` x PP ``pp`` (collective: every rank calls it).

    Args:
        source: a :class:`~megatron_eaopd.models.sources.ModelSource` (``kind`` ``megatron``: a checkpoint;
            else an HF folder at ``path``).
        assets: the folder with its HF ``config.json``.
        objective: the run's objective (what the teacher serves).
        tp, pp: the teacher's layout (``parallel.teacher_tp`` / ``teacher_pp``); equal to the student's:
            the global process groups.
        params_dtype: the teacher's parameter dtype.
        student_info: the student's :class:`ModelInfo` (its padded vocabulary: the rows of each student
            vocabulary shard that ``mode: full`` computes teacher logits for).
        sequence_parallel, seq_multiple: the teacher's sequence parallelism, and the width its inputs are
            padded to a multiple of.
        offload: keep the weights on the host between teacher phases (GPU).
    Returns:
        :class:`Teacher`.
    Raises:
        ConfigError: the teacher's heads / query groups / layers do not divide by ``tp`` / ``pp`` (names
            the settings and the divisors).
    """
    groups = build_teacher_groups(tp, pp)
    try:
        chunks, _ = build_gpt_model(str(assets), params_dtype=params_dtype, perform_initialization=False,
                                    pg_collection=groups.pg_collection, sequence_parallel=sequence_parallel)
    except ValueError as e:
        raise ConfigError(f"config error at parallel.teacher_tp/teacher_pp ({tp}/{pp}): the teacher cannot be split "
                          f"this way: {e}") from e
    if source.kind == "megatron":
        load_checkpoint(source.path, chunks, metadata=None if groups.same_layout else {"dp_cp_group": groups.dp_cp_group})
    else:
        load_hf_weights(chunks, source.path, progress=False)
    return Teacher(chunks, objective, offload=offload, groups=groups, student_padded_vocab=student_info.padded_vocab_size,
                   seq_multiple=seq_multiple)
