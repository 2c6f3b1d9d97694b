"""Every layout rule in one place: how a run's batch and processes split, and what must divide what.

Two kinds of rule:

* :func:`check_static_layout` needs only the configuration (the batch structure, combinations the
  layout cannot serve); the schema runs it at load, so a bad recipe fails before any process starts;
* :func:`resolve_layout` needs the launched world (process count, CUDA, Transformer Engine): TP x PP
  (the student's and the teacher's) divides the world, the batch splits over data-parallel ranks,
  ``auto`` switches resolve. The trainer calls it once ``torch.distributed`` is up; the SLURM
  pre-check calls it with the allocation's numbers;
* :func:`check_model_split` needs a model's shape (heads, query groups, layers): TP divides the heads
  and query groups, PP the layers. The trainer calls it for both models before building them. (The
  vocabulary never constrains a layout: Megatron pads it to a multiple of 128 x TP.)

The teacher has its own layout (``parallel.teacher_tp`` / ``teacher_pp``, default the student's; its DP
is what remains of the world): teacher and student are colocated on every rank, each on its own process
groups (:mod:`megatron_eaopd.teacher.groups`).

Batch vocabulary (sequences, all DP ranks together unless noted): global batch = prompts per
iteration x samples per prompt; mini-batch = global batch / ``train.mini_batches`` (one optimizer
step); micro-batch = ``train.micro_batch_size`` sequences of one DP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_eaopd.config.errors import ConfigError

__all__ = ["RuntimeLayout", "check_static_layout", "resolve_layout", "check_model_split"]


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
        teacher_sequence_parallel, teacher_seq_multiple: the same for the teacher (its TP).
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
    teacher_sequence_parallel: bool = False
    teacher_seq_multiple: int = 1

    @property
    def same_teacher_layout(self) -> bool:
        """True when the teacher runs in the student's TP/PP layout (the global process groups)."""
        return (self.teacher_tp, self.teacher_pp) == (self.tp, self.pp)


def check_static_layout(cfg) -> None:
    """Rules that need only the configuration (the schema calls this at load).

    Args:
        cfg: the :class:`megatron_eaopd.config.Config` being validated.

    Raises:
        ValueError: the global batch does not split into ``train.mini_batches``; the mini-batch does
            not split into micro-batches; ``parallel.sequence_parallel: true`` at TP = 1. (Wrapped into a
            ``ConfigError`` by the loader with the key path.)
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
            run.
    """
    p, t = cfg.parallel, cfg.train
    te = cuda if te is None else te
    ttp, tpp = p.resolved_teacher_tp, p.resolved_teacher_pp
    for name, a, b in (("tp x pp", p.tp, p.pp), ("teacher_tp x teacher_pp", ttp, tpp)):
        if world_size % (a * b):
            fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(
                f"config error at parallel: {name} = {a} x {b} = {a * b} does not divide the world size "
                f"{world_size} (number of launched processes); pick sizes whose product is one of {fits}, "
                f"or launch a multiple of {a * b} processes"
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
    sp = (cuda and te and p.tp > 1) if p.sequence_parallel == "auto" else bool(p.sequence_parallel)
    tsp = (cuda and te and ttp > 1) if p.sequence_parallel == "auto" else bool(p.sequence_parallel) and ttp > 1
    dopt = cuda if p.use_distributed_optimizer == "auto" else bool(p.use_distributed_optimizer)
    return RuntimeLayout(
        world_size=world_size, tp=p.tp, pp=p.pp, dp=dp, teacher_tp=ttp, teacher_pp=tpp,
        teacher_dp=world_size // (ttp * tpp), sequence_parallel=sp, use_distributed_optimizer=dopt,
        global_batch=cfg.global_batch, mini_batch=mb, micro_batches_per_step=mb // (t.micro_batch_size * dp),
        seq_multiple=p.tp if sp else 1, teacher_sequence_parallel=tsp, teacher_seq_multiple=ttp if tsp else 1,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model_split(role: str, heads: int, query_groups: int, layers: int, tp: int, pp: int) -> None:
    """A model's shape against its TP/PP: TP divides the attention heads and the KV (query) groups, PP the layers.

    Args:
        role: ``"student"`` or ``"teacher"`` (names the settings in the error).
        heads, query_groups, layers: the HF ``num_attention_heads``, ``num_key_value_heads``,
            ``num_hidden_layers``.
        tp, pp: the model's layout.
    Raises:
        ConfigError: names the setting (``parallel.tp``/``pp`` or ``parallel.teacher_tp``/``teacher_pp``),
            the model's numbers and the sizes that would work.
    """
    key_tp, key_pp = ("parallel.tp", "parallel.pp") if role == "student" else ("parallel.teacher_tp", "parallel.teacher_pp")
    if heads % tp or query_groups % tp:
        ok = [d for d in _divisors(heads) if query_groups % d == 0]
        raise ConfigError(f"config error at {key_tp}: {tp} does not divide the {role}'s {heads} attention heads and "
                          f"{query_groups} KV groups; use one of {ok}")
    if layers % pp:
        raise ConfigError(f"config error at {key_pp}: {pp} does not divide the {role}'s {layers} layers; use one of "
                          f"{_divisors(layers)}")
