"""The on-policy distillation trainer: set up typed components, then a loop of five visible phase calls.

    prompts --> rollout (student samples) --> teacher scoring (TeacherScores)
            --> old log-probs (student, no grad) --> update (mini-batches of optimizer steps)
            --> metrics + checkpoint

Components (built in :meth:`Trainer.setup`): the :class:`~megatron_eaopd.student.Student` (model, DDP,
optimizer, schedule), the frozen :class:`~megatron_eaopd.teacher.Teacher`, the
:class:`~megatron_eaopd.loss.Objective`, the rollout engine
(:func:`~megatron_eaopd.rollout.factory.make_engine`) and the prompt loader. The phases are the
functions of :mod:`megatron_eaopd.phases`; the run state is saved and restored by
:mod:`megatron_eaopd.train_state`. Each DP rank rolls out its own slice of the iteration's prompts;
TP ranks of a DP group sample identically.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from pydantic import ValidationError
from transformers import AutoTokenizer

from megatron_eaopd.config import Config, ConfigError, check_model_split, resolve_layout, write_resolved_config
from megatron_eaopd.data import PromptDataset, PromptLoader, load_records, write_skipped_prompts
from megatron_eaopd.distributed import (
    all_reduce_scalars,
    init_distributed,
    init_model_parallel,
    is_rank0,
    print_rank0,
    seed_everything,
)
from megatron_eaopd.evaluation.grading import GradingPool
from megatron_eaopd.evaluation.runner import resolve_benchmarks
from megatron_eaopd.evaluation.validation import run_validation
from megatron_eaopd.logger import MetricsLogger
from megatron_eaopd.loss import build_objective
from megatron_eaopd.models.backend import te_available
from megatron_eaopd.models.hf import load_hf_config
from megatron_eaopd.models.sources import resolve_model_source
from megatron_eaopd.phases import (
    counts_once,
    old_log_probs_phase,
    reduce_rollout_sums,
    rollout_phase,
    rollout_sums,
    teacher_phase,
    update_phase,
)
from megatron_eaopd.prompts import PromptFormat
from megatron_eaopd.rollout import stop_token_ids
from megatron_eaopd.rollout.factory import make_engine
from megatron_eaopd.settings import format_validation_error
from megatron_eaopd.student import build_student
from megatron_eaopd.teacher.build import build_teacher, shared_vocab_size
from megatron_eaopd.train_state import resume_train_state, save_train_state

__all__ = ["Trainer", "train"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dtype(name: str) -> torch.dtype:
    """The parameter dtype for a config name; reduced precision needs a GPU here (fp32 on CPU, with a note)."""
    dt = _DTYPES[name]
    if not torch.cuda.is_available() and dt != torch.float32:
        print_rank0(f"[eopd] {name} parameters need a GPU here; using fp32 on CPU")
        return torch.float32
    return dt


def _loss_config(cfg: Config, vocab_size: int):
    """``cfg.loss`` with the vocabulary size set; a value that does not fit it (``top_k`` > vocabulary) is a
    :class:`ConfigError` naming the key."""
    if cfg.loss.top_k > vocab_size:
        raise ConfigError(f"config error at loss.top_k: {cfg.loss.top_k} exceeds the vocabulary of {vocab_size} ids; "
                          f"choose loss.top_k <= {vocab_size} (the recipes use 16)")
    try:
        return cfg.loss.with_vocab_size(vocab_size)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, type(cfg.loss), prefix="loss")) from None


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer checkpoints and exits at the next iteration boundary."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        """True on every rank if any rank received a signal (one MAX all-reduce)."""
        flag = all_reduce_scalars({"signal": 1.0 if self.signum is not None else 0.0}, op=dist.ReduceOp.MAX)
        return flag["signal"] > 0


class Trainer:
    """EOPD training of a Megatron student against a frozen Megatron teacher.

    Args:
        cfg: the validated :class:`megatron_eaopd.config.Config`.
    Raises:
        ConfigError: layout / batch sizes that do not fit the launched world, missing paths,
            unsupported combinations (at :meth:`setup`).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = cfg.checkpoint_dir()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process groups, tokenizer and data, student, objective, teacher, resume, rollout engine, logger."""
        cfg = self.cfg
        init_distributed()
        self.layout = layout = resolve_layout(cfg, dist.get_world_size(), torch.cuda.is_available(), te_available())
        self._resolve_sources()
        init_model_parallel(tp=layout.tp, pp=layout.pp)
        seed_everything(cfg.train.seed)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._build_tokenizer_and_data()
        self._check_model_splits()
        self.student = build_student(str(self.sources["student"].assets), params_dtype=model_dtype(cfg.student.dtype),
                                     opt_cfg=cfg.optimizer, total_steps=self.total_iterations * cfg.train.mini_batches,
                                     use_distributed_optimizer=layout.use_distributed_optimizer,
                                     sequence_parallel=layout.sequence_parallel)
        info = self.student.info
        self.vocab_size = self._shared_vocab_size()
        self.objective = build_objective(_loss_config(cfg, self.vocab_size))
        if is_rank0():  # only once every input has been checked: a failed start leaves no files behind
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, self.run_dir, layout)
            write_skipped_prompts(self.dataset, self.run_dir)
        tsrc = self.sources["teacher"]
        self.teacher = build_teacher(tsrc, str(tsrc.assets), self.objective, tp=layout.teacher_tp, pp=layout.teacher_pp,
                                     params_dtype=model_dtype(cfg.teacher.dtype), student_info=info,
                                     sequence_parallel=layout.teacher_sequence_parallel,
                                     seq_multiple=layout.teacher_seq_multiple, offload=cfg.teacher.offload)
        self.start_iteration = resume_train_state(self.ckpt_dir, self.student, self.loader, cfg.checkpoint.resume)
        if self.start_iteration is None:
            self.start_iteration = 0
            src = self.sources["student"]
            self.student.load_weights(**({"checkpoint": str(src.path)} if src.kind == "megatron" else {"hf_path": str(src.path)}))
        self.stop_ids = stop_token_ids(self.tokenizer, info.eos_token_ids, cfg.data.chat_template)
        self.engine = make_engine(self.student.chunks, self.tokenizer, stop_ids=self.stop_ids, kind=cfg.rollout.engine,
                                  max_batch_size=cfg.rollout.max_batch_size, kv_buffer_gb=cfg.rollout.kv_buffer_gb,
                                  true_vocab_size=self.vocab_size)
        self.preemption = _Preemption()
        self.logger = MetricsLogger(
            self.run_dir, self.total_iterations, self.start_iteration, jsonl=cfg.logging.jsonl,
            tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project, wandb_name=cfg.logging.wandb_name,
            log_interval=cfg.logging.log_interval, progress=os.environ.get("EAOPD_PROGRESS", "1") != "0",
            config=cfg.model_dump(mode="json"),
        )
        self._grader = None
        print_rank0(
            f"[eopd] world={layout.world_size} TP={layout.tp} PP={layout.pp} DP={layout.dp} | teacher TP={layout.teacher_tp} "
            f"PP={layout.teacher_pp} DP={layout.teacher_dp}{'' if layout.same_teacher_layout else ' (own groups)'} | "
            f"student {info.architecture} {self.student.num_params / 1e6:.1f}M params, vocab {info.true_vocab_size} "
            f"(padded {info.padded_vocab_size}; compared over {self.vocab_size}) | "
            f"{len(self.dataset)} prompts ({self.dataset.num_skipped} skipped as longer than {cfg.data.max_prompt_tokens} "
            f"tokens) | {self.engine.kind} rollout engine, stop ids {list(self.stop_ids)} | {self.total_iterations} "
            f"iterations x {cfg.train.mini_batches} optimizer steps | run dir {self.run_dir}"
        )

    def _resolve_sources(self) -> None:
        """Resolve every model path before anything heavy starts (clear errors, no tracebacks): a checkpoint
        (it carries its HF assets) or else ``hf_path`` (a folder or a cached hub id) per model, the tokenizer,
        and the training files."""
        cfg = self.cfg
        self.sources, self.tokenizer_source = {}, None
        for role in ("student", "teacher"):
            m = getattr(cfg, role)
            if m.checkpoint:
                src = resolve_model_source(m.checkpoint, key=f"{role}.checkpoint", kinds=("megatron",), need="weights")
            else:
                src = resolve_model_source(m.hf_path, key=f"{role}.hf_path", kinds=("hf_dir", "hub"), need="weights")
            self.sources[role] = src
        tok = cfg.student.tokenizer
        self.tokenizer_source = (resolve_model_source(tok, key="student.tokenizer", need="tokenizer").assets if tok
                                 else self.sources["student"].assets)
        for f in cfg.data.train_files:
            if "://" not in f and not Path(f).exists() and (os.sep in f or f.endswith((".jsonl", ".parquet", ".json"))):
                raise ConfigError(f"config error at data.train_files: {f!r} does not exist")
            if Path(f).is_dir():
                raise ConfigError(f"config error at data.train_files: {f!r} is a directory; list the JSONL/Parquet "
                                  f"files inside it")
        if cfg.eval.interval and cfg.eval.files:  # validation runs mid-training: its files must exist from the start
            try:
                resolve_benchmarks(list(cfg.eval.files), None)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config error at eval.files: {e}") from None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"config error at logging.run_dir: {str(self.run_dir)!r} exists and is not a directory; "
                              f"choose another run directory")

    def _build_tokenizer_and_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_source))
        records = []
        for f in cfg.data.train_files:
            records += load_records(f, cfg.data.field_map(), split=cfg.data.split, limit=cfg.data.limit,
                                    skip_bad_answers=True)
        self.dataset = PromptDataset(records, tokenizer=self.tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                     chat_template=cfg.data.chat_template, suffix=cfg.data.prompt_suffix,
                                     separator=cfg.data.prompt_separator)
        self.loader = PromptLoader(self.dataset, cfg.train.prompts_per_iteration, seed=cfg.data.shuffle_seed,
                                   num_epochs=None)
        self.total_iterations = cfg.total_iterations(len(self.dataset))
        self.prompt_format = PromptFormat(chat_template=cfg.data.chat_template, suffix=cfg.data.prompt_suffix,
                                          separator=cfg.data.prompt_separator)

    def _check_model_splits(self) -> None:
        """Each model's heads / KV groups / layers against its TP / PP (clear errors before anything is built)."""
        layout = self.layout
        for role, tp, pp in (("student", layout.tp, layout.pp), ("teacher", layout.teacher_tp, layout.teacher_pp)):
            c = load_hf_config(str(self.sources[role].assets))
            heads = int(c.num_attention_heads)
            check_model_split(role, heads, int(getattr(c, "num_key_value_heads", None) or heads),
                              int(c.num_hidden_layers), tp, pp)
            _loss_config(self.cfg, int(c.vocab_size))  # e.g. loss.top_k larger than the vocabulary, before any build

    def _shared_vocab_size(self) -> int:
        """The vocabulary the objective and the sampler use (:func:`megatron_eaopd.teacher.build.shared_vocab_size`):
        the student's rows when both logit widths are equal, else the shared tokenizer's size."""
        src = self.sources["teacher"]
        teacher_rows = int(load_hf_config(str(src.assets)).vocab_size)
        try:
            teacher_tok = AutoTokenizer.from_pretrained(str(src.assets))
        except (OSError, ValueError):  # no tokenizer files beside the teacher's weights
            teacher_tok = None
        added = set(self.tokenizer.get_added_vocab()) | (set(teacher_tok.get_added_vocab()) if teacher_tok else set())
        return shared_vocab_size(self.student.info.true_vocab_size, teacher_rows, self.tokenizer.get_vocab(),
                                 teacher_tok.get_vocab() if teacher_tok else None, override=self.cfg.loss.vocab_size,
                                 added=added, names=(f"student ({self.tokenizer_source})", f"teacher ({src.assets})"))

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def save(self, iteration: int) -> Path:
        """Checkpoint model, optimizer, scheduler, RNG, data position and the prompt format (collective)."""
        meta = {"loss_mode": self.cfg.loss.mode, "prompt_format": self.prompt_format.to_dict()}
        return save_train_state(self.ckpt_dir, iteration, self.student, self.loader, keep_last=self.cfg.checkpoint.keep_last,
                                metadata=meta)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def iteration(self, it: int) -> dict:
        """One EOPD iteration: the five phases, then metrics identical on every rank."""
        cfg, layout = self.cfg, self.layout
        t0 = time.perf_counter()
        mine = self.loader.next_batch()[self.dp_rank::self.dp]
        batch = rollout_phase(self.engine, [p.input_ids for p in mine], cfg.rollout.params(), it)
        t1 = time.perf_counter()
        dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        mbs = batch.micro_batches(cfg.train.micro_batch_size, dev, layout.seq_multiple)
        scores = teacher_phase(self.teacher, mbs)
        objective = self.objective.for_iteration(scores, mbs, dp_group=ps.get_data_parallel_group())
        t2 = time.perf_counter()
        old = old_log_probs_phase(self.student, objective, mbs)
        upd = update_phase(self.student, objective, mbs, scores, old, cfg.train.mini_batches)
        t3 = time.perf_counter()
        correct = self._grade(batch, mine) if counts_once() else None
        keys = objective.sum_keys
        local = {**{k: upd.sums.get(k, 0.0) for k in keys}, **rollout_sums(batch, correct)}
        world = all_reduce_scalars(local, contribute=counts_once())
        metrics = objective.reduce({k: world[k] for k in keys})
        metrics.update(reduce_rollout_sums(world))
        elapsed = time.perf_counter() - t0
        metrics.update(
            grad_norm=sum(upd.grad_norms) / len(upd.grad_norms) if upd.grad_norms else float("nan"), lr=upd.lr,
            time_rollout=t1 - t0, time_teacher=t2 - t1, time_train=t3 - t2, time_iteration=elapsed,
            tokens_per_second=metrics["num_tokens"] / max(elapsed, 1e-9),
        )
        return metrics

    def _grade(self, batch, prompts) -> list[bool]:
        """Whether each rollout's boxed answer matches its prompt's gold answer (math-verify; monitoring only)."""
        if self._grader is None:
            self._grader = GradingPool(workers=1, timeout=5.0)
        answers = [prompts[int(i)].answer for i in batch.prompt_index]
        return [r.correct for r in self._grader.grade(list(zip(answers, batch.response_texts)))]

    def run(self) -> dict:
        """Train to ``total_iterations``; checkpoint every ``save_interval``, at the end and on preemption."""
        cfg = self.cfg
        last: dict = {}
        it = self.start_iteration
        saved_at = it
        try:
            while it < self.total_iterations:
                metrics = self.iteration(it)
                it += 1
                bad = [k for k in ("loss", "rkl_term") if not math.isfinite(metrics[k])]
                if bad:
                    raise FloatingPointError(f"iteration {it}: non-finite {bad} ({metrics}); stopping before it is saved")
                if cfg.eval.interval and it % cfg.eval.interval == 0:
                    metrics.update(self.validate(it))
                self.logger.log(it, metrics)
                last = metrics
                if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
                    self.save(it)
                    saved_at = it
                if self.preemption.requested():
                    if saved_at != it:
                        self.save(it)
                    print_rank0(f"[eopd] preempted: checkpoint saved at iteration {it} in {self.ckpt_dir}; "
                                f"rerun the same command to resume")
                    return {"iteration": it, "preempted": True, **last}
            if saved_at != it:
                self.save(it)
            if cfg.checkpoint.export_hf and it == self.total_iterations:
                self.export_hf()
        finally:
            self.logger.close()
            if self._grader is not None:
                self._grader.close()
        return {"iteration": it, "preempted": False, **last}

    def validate(self, iteration: int) -> dict:
        """Avg@n / Pass@k of the current student on the held-out ``eval`` files (collective)."""
        return run_validation(self.student.chunks, self.tokenizer, self.cfg.eval, iteration, self.run_dir / "eval",
                              self.stop_ids, self.cfg.data.chat_template, rollout_engine=self.engine,
                              prompt_format=self.prompt_format)

    def export_hf(self) -> Path:
        """Export the final checkpoint to Hugging Face format under ``<run_dir>/hf_student``.

        Rank 0 runs the converter in a fresh single process (a world of one at TP = PP = 1: the
        checkpoint reshards on load), so the training process groups are left alone; the other ranks
        wait at a barrier. Raises RuntimeError (on rank 0) if the export fails.
        """
        out = self.run_dir / "hf_student"
        if dist.is_initialized():
            dist.barrier()
        if is_rank0():
            # a clean world of one: no torchrun/SLURM rank variables (TORCHELASTIC_USE_AGENT_STORE would make
            # it connect to the launcher's store as a client and wait for a server that never answers)
            launcher_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                             "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"}
            env = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("TORCHELASTIC_")}
            code = ("import sys; from megatron_eaopd.models.convert import export_hf; "
                    "export_hf(sys.argv[1], sys.argv[2], progress=False)")
            proc = subprocess.run([sys.executable, "-c", code, str(self.ckpt_dir), str(out)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"export of {self.ckpt_dir} to {out} failed:\n{proc.stderr[-3000:]}")
            print_rank0(f"[eopd] exported the student to {out}")
        if dist.is_initialized():
            dist.barrier()
        return out


def train(cfg: Config) -> dict:
    """Set up and run a :class:`Trainer`; returns the last iteration's metrics."""
    t = Trainer(cfg)
    t.setup()
    return t.run()
