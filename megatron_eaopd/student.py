"""The trained model: Megatron ``GPTModel`` + DDP + optimizer + LR schedule, and the rules that keep them consistent.

:func:`build_student` wires the student as Megatron-LM's ``setup_model_and_optimizer`` does:
``build_gpt_model`` -> ``DistributedDataParallel`` (fp32 gradient reduce, overlapped reduce and
param all-gather on CUDA, the distributed optimizer where chosen) -> ``get_megatron_optimizer`` (Adam
with decoupled weight decay) -> ``OptimizerParamScheduler`` (warmup + cosine/linear/constant). The
trainer and the GPU benchmark both call it.

Three orderings matter and live here, not in the callers:

* **Weights after the optimizer.** With bf16/fp16 parameters the optimizer keeps fp32 main weights
  cloned from the model when it is built; loading weights afterwards must refresh them
  (:meth:`Student.load_weights` calls ``optimizer.reload_model_params()``, as Megatron-LM does after a
  load), or the first step writes the random initialisation back into the model.
* **Parameters synced before they are read outside a training step.** With the distributed
  optimizer and an overlapped param all-gather, a step leaves the gather to the next training
  forward; :meth:`Student.sync_params` forces it (Megatron-LM's ``disable_forward_pre_hook`` /
  ``enable_forward_pre_hook`` pair) so rollouts, validation, checkpoints and exports read the
  updated weights on every DP rank.
* **Loss scaling.** fp16 scales the loss by the optimizer's loss scale
  (``TransformerConfig.grad_scale_func = optimizer.scale_loss``) that the optimizer divides out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_eaopd.checkpoint import load_checkpoint
from megatron_eaopd.models.convert import load_hf_weights
from megatron_eaopd.models.provider import ModelInfo, build_gpt_model

__all__ = ["Student", "build_student", "build_scheduler"]


@dataclass
class Student:
    """The student's model chunks (DDP-wrapped), optimizer and LR schedule on this rank.

    Attributes:
        chunks: one DDP-wrapped ``GPTModel`` (virtual pipeline is not used).
        optimizer: Megatron optimizer (``ChainedOptimizer`` / ``DistributedOptimizer`` / fp16 wrapper).
        scheduler: ``OptimizerParamScheduler``.
        info: :class:`~megatron_eaopd.models.provider.ModelInfo` (vocabulary, EOS ids, HF assets).
        ddp_config: the ``DistributedDataParallelConfig`` in use.
        num_params: parameters on this rank.
    """

    chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    info: ModelInfo
    ddp_config: DistributedDataParallelConfig
    num_params: int

    @property
    def overlaps_param_gather(self) -> bool:
        """True when steps leave the param all-gather to the next forward (distributed optimizer, CUDA)."""
        return bool(self.ddp_config.use_distributed_optimizer and self.ddp_config.overlap_param_gather)

    def load_weights(self, checkpoint: str | None = None, hf_path: str | None = None) -> None:
        """Load the model weights (a Megatron checkpoint, else an HF folder) and refresh the optimizer's
        fp32 main weights from them (``optimizer.reload_model_params``; a no-op for fp32 parameters).

        Raises:
            ValueError: neither source given. Errors of :func:`megatron_eaopd.checkpoint.load_checkpoint`
            / :func:`megatron_eaopd.models.convert.load_hf_weights`.
        """
        if checkpoint:
            load_checkpoint(checkpoint, self.chunks)
        elif hf_path:
            load_hf_weights(self.chunks, hf_path, progress=False)
        else:
            raise ValueError("Student.load_weights needs a checkpoint or an hf_path")
        self.optimizer.reload_model_params()

    def sync_params(self) -> None:
        """Finish any pending (overlapped) param all-gather now, on every DP rank (collective).

        Call after the update phase: rollouts, validation, checkpoint saves and exports then read the
        updated parameters. No-op unless :attr:`overlaps_param_gather`.
        """
        if not self.overlaps_param_gather:
            return
        for m in self.chunks:
            m.disable_forward_pre_hook(param_sync=True)
            m.enable_forward_pre_hook()

    def zero_grad(self) -> None:
        """Zero the DDP gradient buffers and the optimizer's gradients before a mini-batch."""
        for m in self.chunks:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float | None]:
        """One optimizer step (gradient clipping inside); the LR schedule advances only when it was taken
        (an fp16 step skipped for inf/NaN gradients does not move it, as in Megatron-LM's ``train_step``).

        Returns:
            ``(taken, grad_norm)``; ``grad_norm`` is the pre-clip global L2 norm (None if not computed).
        """
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return bool(ok), None if grad_norm is None else float(grad_norm)

    def train(self) -> None:
        """Put every chunk in training mode (engines and scoring leave them in eval mode)."""
        for m in self.chunks:
            m.train()

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])


def build_scheduler(optimizer, opt_cfg, total_steps: int) -> OptimizerParamScheduler:
    """Warmup then decay to ``min_lr`` over ``decay_steps`` (default: the run), in optimizer steps.

    Args:
        optimizer: the Megatron optimizer.
        opt_cfg: the ``optimizer`` section (:class:`megatron_eaopd.config.OptimizerConfig`).
        total_steps: optimizer steps in the run (iterations x mini-batches).
    Source: Megatron-LM ``get_optimizer_param_scheduler``. On resume the configuration's schedule
    wins (a run extended with more iterations gets a new decay) while the step count comes from
    the checkpoint.
    """
    decay_steps = opt_cfg.decay_steps or total_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt_cfg.warmup_steps else opt_cfg.lr, max_lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        lr_warmup_steps=min(opt_cfg.warmup_steps, max(decay_steps - 1, 0)), lr_decay_steps=decay_steps,
        lr_decay_style=opt_cfg.decay, start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


def build_student(model_source, *, params_dtype: torch.dtype, opt_cfg, total_steps: int,
                  use_distributed_optimizer: bool, cuda: bool | None = None, **model_overrides) -> Student:
    """Build this rank's student at the current TP/PP (weights uninitialised until :meth:`Student.load_weights`).

    Args:
        model_source: an HF config source (:func:`megatron_eaopd.models.provider.build_gpt_model`:
            folder, checkpoint ``hf_assets`` folder, dict or ``PretrainedConfig``).
        params_dtype: parameter dtype (bf16 on GPU; fp32 on CPU).
        opt_cfg: the ``optimizer`` section (``lr``, ``min_lr``, ``weight_decay``, ``betas``, ``eps``,
            ``clip_grad``, ``warmup_steps``, ``decay``, ``decay_steps``).
        total_steps: optimizer steps of the run (for the schedule).
        use_distributed_optimizer: shard optimizer state over DP (Megatron's distributed optimizer).
        cuda: overlap gradient reduce / param gather (default: ``torch.cuda.is_available()``).
        **model_overrides: ``TransformerConfig`` fields (e.g. ``sequence_parallel``).
    Returns:
        :class:`Student`.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    chunks, info = build_gpt_model(model_source, params_dtype=params_dtype, **model_overrides)
    model = chunks[0]
    mcfg = model.config
    mcfg.calculate_per_token_loss = True
    mcfg.finalize_model_grads_func = finalize_model_grads
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cuda, overlap_param_gather=cuda and use_distributed_optimizer,
        use_distributed_optimizer=use_distributed_optimizer, average_in_collective=False,
    )
    ddp = DistributedDataParallel(mcfg, ddp_cfg, model)
    if cuda:
        mcfg.no_sync_func = ddp.no_sync
        mcfg.grad_sync_func = ddp.start_grad_sync
        if use_distributed_optimizer:
            mcfg.param_sync_func = ddp.start_param_sync
    o = opt_cfg
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad, bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16, params_dtype=params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [ddp],
    )
    if params_dtype == torch.float16:
        mcfg.grad_scale_func = optimizer.scale_loss  # the schedule scales the loss; the optimizer unscales
    return Student(chunks=[ddp], optimizer=optimizer, scheduler=build_scheduler(optimizer, o, total_steps), info=info,
                   ddp_config=ddp_cfg, num_params=sum(p.numel() for p in model.parameters()))
