"""A training run's resumable state: model, optimizer, LR schedule, RNG streams and data position.

:func:`save_train_state` writes one atomic checkpoint (:func:`megatron_eaopd.checkpoint.save_checkpoint`:
sharded model + optimizer state, plus a ``common`` part with the scheduler, the prompt loader's
position and every rank's RNG state) and prunes old ones; :func:`resume_train_state` restores all of
it. Resuming at another world size restores everything but the RNG streams (a note says so).

Source: Megatron-LM ``megatron.training.checkpointing.save_checkpoint`` / ``load_checkpoint`` (what a
training checkpoint holds), simplified.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_eaopd.checkpoint import (
    LATEST,
    load_checkpoint,
    model_sharded_state_dict,
    read_checkpoint_metadata,
    save_checkpoint,
)
from megatron_eaopd.checkpoint_optimizer import load_optimizer_state, optimizer_sharded_state_dict
from megatron_eaopd.config.errors import ConfigError
from megatron_eaopd.distributed import is_rank0, print_rank0
from megatron_eaopd.student import Student

__all__ = ["optimizer_sharded_state", "save_train_state", "resume_train_state", "rng_states_all_ranks",
           "restore_rng"]


def optimizer_sharded_state(student: Student, is_loading: bool, checkpoint: str | Path | None = None) -> dict:
    """The optimizer's sharded state dict for ``dist_checkpointing`` (the distributed optimizer written
    ``dp_reshardable``: no gather into host memory; see :mod:`megatron_eaopd.checkpoint_optimizer`).

    Args:
        student: the student.
        is_loading: build the template a load fills.
        checkpoint: when loading, the checkpoint (its saved sharding is used).
    Raises:
        ConfigError: the checkpoint's optimizer state does not fit this run (optimizer kind, TP/PP).
    """
    msd = model_sharded_state_dict(student.chunks)["model"]
    try:
        return optimizer_sharded_state_dict(student.optimizer, msd,
                                            use_distributed_optimizer=student.ddp_config.use_distributed_optimizer,
                                            is_loading=is_loading, checkpoint=checkpoint)
    except ValueError as e:
        raise ConfigError(f"config error at checkpoint.dir: {e}") from e


def rng_states_all_ranks() -> list:
    """Every rank's RNG state (torch CPU/CUDA generator + Megatron's TP-aware tracker), gathered so that
    rank 0's ``common`` part of the checkpoint holds one entry per global rank (collective)."""
    mine = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def restore_rng(states: Any) -> None:
    """Restore this rank's RNG state from :func:`rng_states_all_ranks` (skipped, with a note, if the
    world size changed)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(states, list) or len(states) != world:
        print_rank0("[eopd] RNG state not restored: the checkpoint was saved with another number of processes")
        return
    mine = states[dist.get_rank() if dist.is_initialized() else 0]
    torch.set_rng_state(mine["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(mine["tracker"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])


def save_train_state(ckpt_dir: str | Path, iteration: int, student: Student, loader, *,
                     keep_last: int | None = None, metadata: dict | None = None) -> Path:
    """Checkpoint everything a resume needs, atomically (collective: every rank).

    Syncs the student's parameters first (an overlapped param all-gather would leave stale shards).

    Args:
        ckpt_dir: the run's checkpoint root.
        iteration: iterations completed.
        student: the :class:`~megatron_eaopd.student.Student`.
        loader: the prompt loader (``state_dict()``).
        keep_last: keep this many newest ``iter_*`` folders (None: all).
        metadata: merged into ``eaopd_checkpoint.json`` (``kind: training`` is always set).
    Returns:
        the ``iter_*`` folder written.
    """
    student.sync_params()
    common = {"scheduler": student.scheduler.state_dict(), "data": loader.state_dict(), "rng": rng_states_all_ranks()}
    path = save_checkpoint(ckpt_dir, iteration, student.chunks,
                           extra_sharded={"optimizer": optimizer_sharded_state(student, False)},
                           extra_common=common, model_info=student.info,
                           extra_metadata={**(metadata or {}), "kind": "training"})
    if is_rank0() and keep_last:
        kept = sorted(p for p in Path(ckpt_dir).glob("iter_*") if p.is_dir())
        for old in kept[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def resume_train_state(ckpt_dir: str | Path, student: Student, loader,
                       resume: Literal["auto", "never", "required"] = "auto") -> int | None:
    """Restore a run from ``ckpt_dir``'s latest checkpoint (collective: every rank).

    Args:
        ckpt_dir: the run's checkpoint root.
        student: built (weights, optimizer state and schedule are restored into it).
        loader: the prompt loader (``load_state_dict``).
        resume: ``auto`` (resume when a checkpoint exists), ``never``, ``required``.
    Returns:
        the iteration resumed from, or None when the run starts fresh (the caller loads the initial
        weights).
    Raises:
        FileNotFoundError: ``resume=required`` and no checkpoint.
        ConfigError: ``ckpt_dir`` holds a converted model instead of a training run; the checkpoint's
            optimizer state does not fit these optimizer settings.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if resume == "never" or not latest.is_file():
        if resume == "required":
            raise FileNotFoundError(f"checkpoint.resume=required but {latest} does not exist")
        return None
    if read_checkpoint_metadata(ckpt_dir).get("kind") != "training":
        raise ConfigError(
            f"config error at checkpoint.dir: {ckpt_dir} holds a converted model, not a training run's "
            f"checkpoints; point student.checkpoint at it and give the run its own checkpoint.dir"
        )
    for opt in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
    it, common, extra = load_checkpoint(ckpt_dir, student.chunks,
                                        extra_sharded={"optimizer": optimizer_sharded_state(student, True, ckpt_dir)})
    try:
        load_optimizer_state(student.optimizer, extra["optimizer"])
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"config error at optimizer: the checkpoint in {ckpt_dir} was saved with other optimizer settings "
            f"(lr / weight_decay / parameter groups): {e}. Resume with the original optimizer settings or start a "
            f"new logging.run_dir / checkpoint.dir"
        ) from e
    student.scheduler.load_state_dict(common["scheduler"])
    note = loader.load_state_dict(common["data"])
    if note:
        print_rank0(f"[eopd] {note}")
    restore_rng(common.get("rng"))
    print_rank0(f"[eopd] resumed from {ckpt_dir} at iteration {it}")
    return it
