"""The on-policy distillation trainer: one iteration is five plain calls (method.md, "Training setup").

    prompts --> rollout (student samples) --> teacher scoring (TeacherSignals)
            --> old log-probs (student, no grad) --> update (mini-batches of EOPD steps) --> metrics + checkpoint

Each DP rank rolls out its own slice of the iteration's prompts; TP ranks of a DP group sample
identically; the global batch is split into ``train.mini_batches`` optimizer steps, each run through
Megatron's ``get_forward_backward_func`` with ``calculate_per_token_loss=True`` so that the loss is the
token mean over the whole mini-batch (all micro-batches and DP ranks), as the paper specifies.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_eaopd.config import Config, ConfigError, write_resolved_config
from megatron_eaopd.distributed import init_distributed, init_model_parallel, is_rank0, print_rank0, seed_everything
from megatron_eaopd.loss import METRIC_KEYS, EOPDConfig, eopd_loss, vocab_parallel_log_probs
from megatron_eaopd.pipeline import MicroBatch, forward_only, is_last_stage, split_micro_batches
from megatron_eaopd.teacher import Teacher

__all__ = ["Trainer", "train"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class IterationState:
    """What one iteration carries between phases (all on this rank)."""

    tokens: torch.Tensor  # [B_local, S]
    loss_mask: torch.Tensor  # [B_local, S-1] bool
    response_lengths: torch.Tensor  # [B_local]
    finished: torch.Tensor  # [B_local]
    texts: list[str]
    answers: list[str]
    signals: dict = field(default_factory=dict)  # micro-batch index -> TeacherSignals (last stage)
    old_log_probs: dict = field(default_factory=dict)  # micro-batch index -> [mb, S-1] (last stage)


def _assets_dir(path: str) -> str:
    """The HF assets (config, tokenizer) of a Megatron checkpoint root/iter dir, or ``path`` itself."""
    from megatron_eaopd.checkpoint import ASSETS_DIR, resolve_checkpoint
    from megatron_eaopd.models.hf import looks_like_megatron_checkpoint

    if looks_like_megatron_checkpoint(path):
        return str(resolve_checkpoint(path) / ASSETS_DIR)
    return path


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
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class Trainer:
    """EOPD training of a Megatron student against a frozen Megatron teacher.

    Args:
        cfg: the validated :class:`megatron_eaopd.config.Config`.
    Raises:
        ConfigError: layout / batch sizes that do not fit the launched world, unsupported combinations.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = cfg.checkpoint_dir()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process groups, tokenizer, data, student (DDP + optimizer + schedule), teacher, resume."""
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        init_distributed()
        cuda = torch.cuda.is_available()
        self.layout = layout = cfg.resolve_runtime(dist.get_world_size(), cuda)
        if (layout.teacher_tp, layout.teacher_pp) != (layout.tp, layout.pp):
            raise ConfigError(
                f"config error at parallel.teacher_tp/teacher_pp: a teacher layout ({layout.teacher_tp}x{layout.teacher_pp}) "
                f"different from the student's ({layout.tp}x{layout.pp}) is not supported yet; leave them unset"
            )
        if cfg.loss.mode == "full" and cfg.teacher.offload:
            raise ConfigError("config error at teacher.offload: mode 'full' runs the teacher inside every student "
                              "micro-batch step, so its weights cannot be offloaded between phases; set it to false")
        self._check_paths()
        if cfg.loss.mode == "full" and layout.pp > 1:
            raise ConfigError("config error at loss.mode: 'full' needs the teacher logits in the student's micro-batch "
                              "step, supported at parallel.pp=1 only; use mode=topk with pipeline parallelism")
        if cfg.train.prompts_per_iteration % layout.dp:
            raise ConfigError(
                f"config error at train.prompts_per_iteration: {cfg.train.prompts_per_iteration} prompts cannot be "
                f"shared evenly by DP={layout.dp} data-parallel ranks; use a multiple of {layout.dp}"
            )
        init_model_parallel(tp=layout.tp, pp=layout.pp)
        seed_everything(cfg.train.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp = ps.get_data_parallel_world_size()
        if is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, self.run_dir, layout)
        self._build_tokenizer_and_data()
        self._build_student()
        self._build_teacher()
        self.start_iteration = self._resume()
        self.preemption = _Preemption()
        from megatron_eaopd.logger import MetricsLogger

        self.logger = MetricsLogger(
            self.run_dir, self.total_iterations, self.start_iteration, jsonl=cfg.logging.jsonl,
            tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
            log_interval=cfg.logging.log_interval, progress=os.environ.get("EAOPD_PROGRESS", "1") != "0",
            config=cfg.model_dump(mode="json"),
        )
        self._grader = None
        print_rank0(
            f"[eopd] world={layout.world_size} TP={layout.tp} PP={layout.pp} DP={layout.dp} | student {self.info.architecture} "
            f"{self.num_params / 1e6:.1f}M params, vocab {self.info.true_vocab_size} (padded {self.info.padded_vocab_size}) | "
            f"{len(self.dataset)} prompts ({self.dataset.num_skipped} skipped as longer than {cfg.data.max_prompt_tokens} tokens) | "
            f"{self.total_iterations} iterations x {cfg.train.mini_batches} optimizer steps | run dir {self.run_dir}"
        )

    def _check_paths(self) -> None:
        """Model and data paths must exist before anything heavy starts (clear errors, no tracebacks)."""
        cfg = self.cfg
        for key, value in (("student.checkpoint", cfg.student.checkpoint), ("teacher.checkpoint", cfg.teacher.checkpoint),
                           ("student.hf_path", cfg.student.hf_path), ("teacher.hf_path", cfg.teacher.hf_path),
                           ("student.tokenizer", cfg.student.tokenizer), ("teacher.tokenizer", cfg.teacher.tokenizer)):
            if value and not Path(value).exists():
                raise ConfigError(f"config error at {key}: {value!r} does not exist (relative paths resolve against "
                                  f"{Path.cwd()}); convert the model first with tools/convert_hf.py import")
        for f in cfg.data.train_files:
            if "://" not in f and not Path(f).exists() and (os.sep in f or f.endswith((".jsonl", ".parquet", ".json"))):
                raise ConfigError(f"config error at data.train_files: {f!r} does not exist")

    def _build_tokenizer_and_data(self) -> None:
        from transformers import AutoTokenizer

        from megatron_eaopd.data import PromptDataset, PromptLoader, load_records

        cfg = self.cfg
        tok_path = _assets_dir(cfg.student.tokenizer_path())
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
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

    def _model_dtype(self, name: str) -> torch.dtype:
        dt = _DTYPES[name]
        if not torch.cuda.is_available() and dt != torch.float32:
            print_rank0(f"[eopd] {name} parameters need a GPU here; using fp32 on CPU")
            return torch.float32
        return dt

    def _parallel_overrides(self) -> dict:
        """TransformerConfig overrides from the resolved layout (sequence parallel needs TE's norms)."""
        from megatron_eaopd.models.provider import te_available

        if self.layout.sequence_parallel and not te_available():
            if self.cfg.parallel.sequence_parallel is True:
                raise ConfigError("config error at parallel.sequence_parallel: true needs Transformer Engine "
                                  "(pip install -e '.[gpu]'); use auto or false")
            return {"sequence_parallel": False}
        return {"sequence_parallel": self.layout.sequence_parallel}

    def _build_student(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_eaopd.models.provider import build_gpt_model

        cfg, layout = self.cfg, self.layout
        src = cfg.student.checkpoint or cfg.student.hf_path
        dtype = self._model_dtype(cfg.student.dtype)
        chunks, self.info = build_gpt_model(_assets_dir(src), params_dtype=dtype, **self._parallel_overrides())
        model = chunks[0]
        self.num_params = sum(p.numel() for p in model.parameters())
        mcfg = model.config
        mcfg.calculate_per_token_loss = True
        mcfg.finalize_model_grads_func = finalize_model_grads
        cuda = torch.cuda.is_available()
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cuda, overlap_param_gather=cuda and layout.use_distributed_optimizer,
            use_distributed_optimizer=layout.use_distributed_optimizer, average_in_collective=False,
        )
        ddp = DistributedDataParallel(mcfg, ddp_cfg, model)
        if cuda:
            mcfg.no_sync_func = ddp.no_sync
            mcfg.grad_sync_func = ddp.start_grad_sync
            if layout.use_distributed_optimizer:
                mcfg.param_sync_func = ddp.start_param_sync
        self.student = [ddp]
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
                adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16, params_dtype=dtype, use_distributed_optimizer=layout.use_distributed_optimizer,
            ),
            self.student,
        )
        steps = self.total_iterations * cfg.train.mini_batches
        decay_steps = o.decay_steps or steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=min(o.warmup_steps, max(decay_steps - 1, 0)), lr_decay_steps=decay_steps,
            lr_decay_style=o.decay, start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(steps, 1),
            wd_incr_style="constant",
            # on resume the config's schedule wins (a run extended with train.iterations gets a new decay),
            # while the step count comes from the checkpoint
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )
        eopd = cfg.loss.to_eopd_config(vocab_size=cfg.loss.vocab_size or self.info.true_vocab_size)
        self.loss_cfg: EOPDConfig = eopd
        self.eos_ids = tuple(self.info.eos_token_ids) or (self.tokenizer.eos_token_id,)

    def _build_teacher(self) -> None:
        from megatron_eaopd.checkpoint import load_checkpoint
        from megatron_eaopd.models.convert import load_hf_weights
        from megatron_eaopd.models.provider import build_gpt_model

        cfg = self.cfg
        src = cfg.teacher.checkpoint or cfg.teacher.hf_path
        chunks, tinfo = build_gpt_model(_assets_dir(src), params_dtype=self._model_dtype(cfg.teacher.dtype),
                                        perform_initialization=False, **self._parallel_overrides())
        if tinfo.true_vocab_size != self.info.true_vocab_size or tinfo.padded_vocab_size != self.info.padded_vocab_size:
            raise ConfigError(
                f"config error at teacher: the teacher's vocabulary ({tinfo.true_vocab_size}, padded "
                f"{tinfo.padded_vocab_size}) differs from the student's ({self.info.true_vocab_size}, padded "
                f"{self.info.padded_vocab_size}); EOPD needs a shared tokenizer"
            )
        if cfg.teacher.checkpoint:
            load_checkpoint(cfg.teacher.checkpoint, chunks)
        else:
            load_hf_weights(chunks, cfg.teacher.hf_path, progress=False)
        self.teacher = Teacher(chunks, self.loss_cfg, offload=cfg.teacher.offload)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _optimizer_state(self, is_loading: bool):
        from megatron_eaopd.checkpoint import model_sharded_state_dict

        msd = model_sharded_state_dict(self.student)["model"]
        meta = {"distrib_optim_sharding_type": "fully_reshardable"} if self.layout.use_distributed_optimizer else None
        return self.optimizer.sharded_state_dict(msd, is_loading=is_loading, metadata=meta)

    def save(self, iteration: int) -> Path:
        """Checkpoint model, optimizer, scheduler, RNG, data position and iteration (atomic; collective)."""
        from megatron.core import tensor_parallel

        from megatron_eaopd.checkpoint import save_checkpoint

        common = {
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": self._rng_states_all_ranks(),
        }
        path = save_checkpoint(self.ckpt_dir, iteration, self.student, extra_sharded={"optimizer": self._optimizer_state(False)},
                               extra_common=common, model_info=self.info,
                               extra_metadata={"kind": "training", "loss_mode": self.cfg.loss.mode})
        if is_rank0() and self.cfg.checkpoint.keep_last:
            kept = sorted(p for p in self.ckpt_dir.glob("iter_*") if p.is_dir())
            for old in kept[: -self.cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def _rng_states_all_ranks() -> list:
        """Every rank's RNG state (torch CPU/CUDA generator + Megatron's TP-aware tracker), gathered so that
        rank 0's ``common`` part of the checkpoint holds one entry per global rank (collective)."""
        from megatron.core import tensor_parallel

        mine = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            mine["cuda"] = torch.cuda.get_rng_state()
        if not dist.is_initialized():
            return [mine]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out

    @staticmethod
    def _restore_rng(states) -> None:
        """Restore this rank's RNG state from :meth:`_rng_states_all_ranks` (skipped if the world size changed)."""
        from megatron.core import tensor_parallel

        world = dist.get_world_size() if dist.is_initialized() else 1
        if not isinstance(states, list) or len(states) != world:
            print_rank0("[eopd] RNG state not restored: the checkpoint was saved with another number of processes")
            return
        mine = states[dist.get_rank() if dist.is_initialized() else 0]
        torch.set_rng_state(mine["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(mine["tracker"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])

    def _resume(self) -> int:
        from megatron_eaopd.checkpoint import LATEST, load_checkpoint

        cfg = self.cfg
        latest = self.ckpt_dir / LATEST
        if cfg.checkpoint.resume != "never" and latest.is_file():
            from megatron_eaopd.checkpoint import read_checkpoint_metadata

            kind = read_checkpoint_metadata(self.ckpt_dir).get("kind")
            if kind != "training":
                raise ConfigError(
                    f"config error at checkpoint.dir: {self.ckpt_dir} holds a converted model, not a training run's "
                    f"checkpoints; point student.checkpoint at it and give the run its own checkpoint.dir"
                )
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                    opt._init_optimizer_states_with_dummy_values()
            it, common, extra = load_checkpoint(self.ckpt_dir, self.student,
                                                extra_sharded={"optimizer": self._optimizer_state(True)})
            try:
                self.optimizer.load_state_dict(extra["optimizer"])
            except (KeyError, ValueError) as e:
                raise ConfigError(
                    f"config error at optimizer: the checkpoint in {self.ckpt_dir} was saved with other optimizer "
                    f"settings (lr / weight_decay / parameter groups): {e}. Resume with the original optimizer "
                    f"settings or start a new logging.run_dir / checkpoint.dir"
                ) from e
            self.scheduler.load_state_dict(common["scheduler"])
            self.loader.load_state_dict(common["data"])
            self._restore_rng(common.get("rng"))
            print_rank0(f"[eopd] resumed from {self.ckpt_dir} at iteration {it}")
            return it
        if cfg.checkpoint.resume == "required":
            raise FileNotFoundError(f"checkpoint.resume=required but {latest} does not exist")
        if cfg.student.checkpoint:
            load_checkpoint(cfg.student.checkpoint, self.student)
        else:
            from megatron_eaopd.models.convert import load_hf_weights

            load_hf_weights(self.student, cfg.student.hf_path, progress=False)
        return 0

    # ------------------------------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------------------------------
    def rollout(self, prompts: list, iteration: int) -> IterationState:
        """The student samples ``rollout.n`` responses per prompt of this DP rank's share."""
        from megatron_eaopd.rollout import Rollout, RolloutParams

        cfg = self.cfg
        params = RolloutParams.from_config(cfg.rollout, eos_ids=self.eos_ids, return_log_probs=False)
        ids = [list(p.input_ids) for p in prompts]
        if self.layout.pp > 1:
            from megatron_eaopd.rollout import sample_with_recompute

            batch = sample_with_recompute(self.student, self.tokenizer, ids, params, call_index=iteration)
        else:
            if not hasattr(self, "_rollout"):
                from megatron_eaopd.models.provider import unwrap

                self._rollout = Rollout.from_config(unwrap(self.student[0]), self.tokenizer, cfg.rollout)
            batch = self._rollout.generate(ids, params, call_index=iteration)
        for m in self.student:
            m.train()
        answers = [prompts[int(i)].answer for i in batch.prompt_index]
        return IterationState(batch.tokens, batch.loss_mask, batch.response_lengths, batch.finished,
                              list(batch.response_texts), answers)

    def micro_batches(self, st: IterationState) -> list[MicroBatch]:
        """This rank's rollouts cut into ``train.micro_batch_size`` rows, on the compute device."""
        dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return split_micro_batches(st.tokens, st.loss_mask, self.cfg.train.micro_batch_size, device=dev)

    def score_teacher(self, st: IterationState, mbs: list[MicroBatch]) -> None:
        """Teacher signals per micro-batch (topk mode; mode=full scores inside the update step)."""
        if self.loss_cfg.mode == "topk":
            st.signals = self.teacher.score(mbs)

    @torch.no_grad()
    def old_log_probs(self, st: IterationState, mbs: list[MicroBatch]) -> None:
        """log pi_old(y_t) of the sampled tokens, recomputed by the trainer's own forward (method.md)."""
        cfg = self.loss_cfg

        def on_logits(mb, logits):
            st.old_log_probs[mb.index] = vocab_parallel_log_probs(
                logits, mb.targets.unsqueeze(-1), vocab_size=cfg.vocab_size, temperature=cfg.temperature
            )[..., 0].float()

        forward_only(self.student, mbs, on_logits)
        for m in self.student:
            m.train()

    def update(self, st: IterationState, mbs: list[MicroBatch]) -> dict:
        """``train.mini_batches`` optimizer steps over the iteration's micro-batches; returns metrics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, layout = self.cfg, self.layout
        per_step = layout.micro_batches_per_step
        fb = get_forward_backward_func()
        sums = {k: 0.0 for k in METRIC_KEYS}
        tokens_total, loss_total, grad_norms = 0.0, 0.0, []
        full = self.loss_cfg.mode == "full"
        for step in range(cfg.train.mini_batches):
            group = mbs[step * per_step:(step + 1) * per_step]
            records = []

            def forward_step(data_iterator, model):
                mb = next(data_iterator)
                out = model(mb.inputs, mb.position_ids, None)

                def loss_func(logits):
                    if full:
                        from megatron_eaopd.loss import teacher_signals

                        sig = teacher_signals(self.teacher.logits_for(mb), mb.targets, self.loss_cfg, keep_logits=True)
                    else:
                        sig = st.signals[mb.index]
                    loss_sum, n_tok, metrics = eopd_loss(logits, sig, st.old_log_probs[mb.index], mb.loss_mask, self.loss_cfg)
                    records.append((float(n_tok), {k: float(v) for k, v in metrics.items()}, float(loss_sum.detach())))
                    return loss_sum, n_tok.to(torch.int), {}

                return out, loss_func

            for m in self.student:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            fb(forward_step_func=forward_step, data_iterator=iter(group), model=self.student, num_microbatches=len(group),
               seq_length=group[0].inputs.shape[1], micro_batch_size=group[0].inputs.shape[0], forward_only=False)
            ok, grad_norm, _ = self.optimizer.step()
            if ok:  # as Megatron-LM's train_step: a step skipped by the fp16 loss scaler does not advance the LR
                self.scheduler.step(increment=1)
            if grad_norm is not None:
                grad_norms.append(float(grad_norm))
            for n, m, ls in records:
                tokens_total += n
                loss_total += ls
                for k in METRIC_KEYS:
                    if k == "num_gated":
                        sums[k] += m[k]
                    elif k == "fkl_gated":
                        sums[k] += m[k] * m["num_gated"]
                    else:
                        sums[k] += m[k] * n
        # token-weighted means over all micro-batches and DP ranks (last stage holds the numbers)
        keys = list(METRIC_KEYS)
        vec = torch.tensor([tokens_total, loss_total] + [sums[k] for k in keys], dtype=torch.float64)
        if torch.cuda.is_available():
            vec = vec.cuda()
        if dist.is_initialized():
            from megatron.core import parallel_state as ps

            if ps.get_tensor_model_parallel_rank() != 0 or not is_last_stage():
                vec.zero_()  # TP ranks hold identical numbers; only count each DP replica once
            dist.all_reduce(vec)
        vec = vec.cpu().tolist()
        n = max(vec[0], 1.0)
        out = {"loss": vec[1] / n, "num_tokens": vec[0]}
        for i, k in enumerate(keys):
            v = vec[2 + i]
            out[k] = v if k == "num_gated" else (v / max(vec[2 + keys.index("num_gated")], 1.0) if k == "fkl_gated" else v / n)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return out

    def _rollout_accuracy(self, st: IterationState) -> float:
        """Fraction of this iteration's rollouts whose boxed answer math-verify accepts (monitoring only)."""
        from megatron.core import parallel_state as ps

        correct = torch.zeros(2, dtype=torch.float64)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            if self._grader is None:
                from megatron_eaopd.evaluation.grading import GradingPool

                self._grader = GradingPool(workers=1, timeout=5.0)
            results = self._grader.grade(list(zip(st.answers, st.texts)))
            correct[0] = sum(1 for r in results if r.correct)
            correct[1] = len(results)
        if torch.cuda.is_available():
            correct = correct.cuda()
        if dist.is_initialized():
            dist.all_reduce(correct)
        return float(correct[0] / max(correct[1], 1.0))

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def iteration(self, it: int) -> dict:
        """One EOPD iteration; returns its metrics (identical on every rank)."""
        t0 = time.perf_counter()
        prompts = self.loader.next_batch()
        mine = prompts[self.dp_rank::self.dp]
        st = self.rollout(mine, it)
        t1 = time.perf_counter()
        mbs = self.micro_batches(st)
        self.score_teacher(st, mbs)
        t2 = time.perf_counter()
        self.old_log_probs(st, mbs)
        metrics = self.update(st, mbs)
        t3 = time.perf_counter()
        acc = self._rollout_accuracy(st)
        resp = torch.tensor([float(st.response_lengths.sum()), float(len(st.response_lengths)),
                             float(st.finished.sum())], dtype=torch.float64)
        if torch.cuda.is_available():
            resp = resp.cuda()
        if dist.is_initialized():
            from megatron.core import parallel_state as ps

            dist.all_reduce(resp, group=ps.get_data_parallel_group())
        resp = resp.cpu().tolist()
        total_tokens = metrics["num_tokens"]
        metrics.update(
            response_length=resp[0] / max(resp[1], 1), finished_fraction=resp[2] / max(resp[1], 1),
            rollout_accuracy=acc, time_rollout=t1 - t0, time_teacher=t2 - t1, time_train=t3 - t2,
            time_iteration=time.perf_counter() - t0, tokens_per_second=total_tokens / max(time.perf_counter() - t0, 1e-9),
        )
        return metrics

    def run(self) -> dict:
        """Train to ``total_iterations``; checkpoint every ``save_interval``, at the end and on preemption."""
        cfg = self.cfg
        last = {}
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
        from megatron_eaopd.evaluation.validation import run_validation

        return run_validation(self.student, self.tokenizer, self.cfg.eval, iteration, self.run_dir / "eval", self.eos_ids,
                              self.cfg.data.chat_template, rollout=getattr(self, "_rollout", None))

    def export_hf(self) -> Path:
        """Export the final checkpoint to Hugging Face format under ``<run_dir>/hf_student``.

        Rank 0 runs the converter in a fresh single process (a world of one at TP = PP = 1: the
        checkpoint reshards on load), so the training process groups are left alone; the other ranks
        wait at a barrier. Raises RuntimeError (on rank 0) if the export fails.
        """
        import subprocess
        import sys

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
