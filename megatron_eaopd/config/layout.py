"""Every layout rule in one place: how a run's batch and processes split, and what must divide what.

Two kinds of rule:

* :func:`check_static_layout` needs only the configuration (the batch structure, combinations the
  layout cannot serve); the schema runs it at load, so a bad recipe fails before any process starts;
* :func:`resolve_layout` needs the launched world (process count, CUDA, Transformer Engine): TP x PP
  divides the world, the batch splits over data-parallel ranks, ``auto`` switches resolve. The
  trainer calls it once ``torch.distributed`` is up; the SLURM pre-check calls it with the
  allocation's numbers.

Batch vocabulary (sequences, all DP ranks together unless noted): global batch = prompts per
iteration x samples per prompt; mini-batch = global batch / ``train.mini_batches`` (one optimizer
step); micro-batch = ``train.micro_batch_size`` sequences of one DP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_eaopd.config.errors import ConfigError

__all__ = ["RuntimeLayout", "check_static_layout", "resolve_layout"]


@dataclass(frozen=True)
class RuntimeLayout:
    """The process layout of a run, resolved against the launched world (see :func:`resolve_layout`).

    Sizes are process counts; batch sizes are sequences.

    Attributes:
        world_size, tp, pp, dp: student layout (DP = world / (TP x PP)).
        teacher_tp, teacher_pp, teacher_dp: the teacher's.
        sequence_parallel: Megatron sequence parallelism on (CUDA, TP > 1, Transformer Engine).
        use_distributed_optimizer: Megatron's distributed optimizer on (CUDA).
        global_batch: sequences per iteration (prompts x ``rollout.n``).
        mini_batch: sequences per optimizer step (all DP ranks).
        micro_batches_per_step: gradient-accumulation micro-batches per DP rank per step.
        seq_multiple: micro-batch sequence lengths are padded (with masked tokens) to a multiple of
            this: TP under sequence parallelism (Megatron scatters the sequence over TP), else 1.
    """

    world_size: int
    tp: int
    pp: int
    dp: int
    teacher_tp: int
    teacher_pp: int
    teacher_dp: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    global_batch: int
    mini_batch: int
    micro_batches_per_step: int
    seq_multiple: int = 1


def check_static_layout(cfg) -> None:
    """Rules that need only the configuration (the schema calls this at load).

    Args:
        cfg: the :class:`megatron_eaopd.config.Config` being validated.

    Raises:
        ValueError: the global batch does not split into ``train.mini_batches``; the mini-batch does
            not split into micro-batches; ``loss.mode: full`` with the teacher in another layout;
            ``parallel.sequence_parallel: true`` at TP = 1. (Wrapped into a ``ConfigError`` by the
            loader with the key path.)
    """
    gb, t, p = cfg.global_batch, cfg.train, cfg.parallel
    if gb % t.mini_batches:
        raise ValueError(
            f"train.prompts_per_iteration x rollout.n = {t.prompts_per_iteration} x {cfg.rollout.n} = {gb} "
            f"sequences is not divisible by train.mini_batches = {t.mini_batches}"
        )
    mb = gb // t.mini_batches
    if mb % t.micro_batch_size:
        raise ValueError(
            f"the mini-batch of {mb} sequences (global batch {gb} / train.mini_batches {t.mini_batches}) "
            f"is not divisible by train.micro_batch_size = {t.micro_batch_size}"
        )
    if cfg.loss.mode == "full" and (p.resolved_teacher_tp != p.tp or p.resolved_teacher_pp != p.pp):
        raise ValueError(
            f"loss.mode 'full' needs the teacher in the student's layout: parallel.teacher_tp/teacher_pp = "
            f"{p.resolved_teacher_tp}/{p.resolved_teacher_pp} but parallel.tp/pp = {p.tp}/{p.pp} "
            "(unset teacher_tp/teacher_pp or use loss.mode 'topk')"
        )
    if p.sequence_parallel is True and p.tp == 1:
        raise ValueError("parallel.sequence_parallel true needs parallel.tp > 1")


def resolve_layout(cfg, world_size: int, cuda: bool, te: bool | None = None) -> RuntimeLayout:
    """Check the configuration against the launched world and resolve the ``auto`` switches.

    Args:
        cfg: the validated :class:`megatron_eaopd.config.Config`.
        world_size: number of processes (``torch.distributed.get_world_size()`` or the allocation's).
        cuda: whether the processes have CUDA.
        te: whether Transformer Engine is usable (sequence parallelism needs its norms); default =
            ``cuda`` (the recipes' GPU clusters run NGC images that have it). The trainer passes
            :func:`megatron_eaopd.models.provider.te_available`.
    Returns:
        :class:`RuntimeLayout`.
    Raises:
        ConfigError: TP x PP (or the teacher's) does not divide the world; the mini-batch or the
            prompts of an iteration do not split over DP; sequence parallelism forced on where it cannot
            run; a teacher layout different from the student's; ``loss.mode: full`` at PP > 1 or with
            ``teacher.offload``.
    """
    p, t = cfg.parallel, cfg.train
    te = cuda if te is None else te
    ttp, tpp = p.resolved_teacher_tp, p.resolved_teacher_pp
    for name, a, b in (("tp x pp", p.tp, p.pp), ("teacher_tp x teacher_pp", ttp, tpp)):
        if world_size % (a * b):
            raise ConfigError(
                f"config error at parallel: {name} = {a} x {b} = {a * b} does not divide the world size "
                f"{world_size} (number of launched processes)"
            )
    dp = world_size // (p.tp * p.pp)
    mb = cfg.global_batch // t.mini_batches
    if mb % (t.micro_batch_size * dp):
        raise ConfigError(
            f"config error at train.micro_batch_size: the mini-batch of {mb} sequences is not divisible by "
            f"micro_batch_size x DP = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
        )
    if t.prompts_per_iteration % dp:
        raise ConfigError(
            f"config error at train.prompts_per_iteration: {t.prompts_per_iteration} prompts cannot be "
            f"shared evenly by DP={dp} data-parallel ranks; use a multiple of {dp}"
        )
    if p.sequence_parallel is True and not cuda:
        raise ConfigError("config error at parallel.sequence_parallel: true needs CUDA (Transformer Engine/Apex norms)")
    if p.sequence_parallel is True and not te:
        raise ConfigError("config error at parallel.sequence_parallel: true needs Transformer Engine "
                          "(pip install -e '.[gpu]'); use auto or false")
    if (ttp, tpp) != (p.tp, p.pp):
        raise ConfigError(
            f"config error at parallel.teacher_tp/teacher_pp: a teacher layout ({ttp}x{tpp}) different from the "
            f"student's ({p.tp}x{p.pp}) is not supported yet; leave them unset"
        )
    if cfg.loss.mode == "full" and p.pp > 1:
        raise ConfigError("config error at loss.mode: 'full' needs the teacher logits in the student's micro-batch "
                          "step, supported at parallel.pp=1 only; use mode=topk with pipeline parallelism")
    if cfg.loss.mode == "full" and cfg.teacher.offload:
        raise ConfigError("config error at teacher.offload: mode 'full' runs the teacher inside every student "
                          "micro-batch step, so its weights cannot be offloaded between phases; set it to false")
    sp = (cuda and te and p.tp > 1) if p.sequence_parallel == "auto" else bool(p.sequence_parallel)
    dopt = cuda if p.use_distributed_optimizer == "auto" else bool(p.use_distributed_optimizer)
    return RuntimeLayout(
        world_size=world_size, tp=p.tp, pp=p.pp, dp=dp, teacher_tp=ttp, teacher_pp=tpp,
        teacher_dp=world_size // (ttp * tpp), sequence_parallel=sp, use_distributed_optimizer=dopt,
        global_batch=cfg.global_batch, mini_batch=mb, micro_batches_per_step=mb // (t.micro_batch_size * dp),
        seq_multiple=p.tp if sp else 1,
    )
