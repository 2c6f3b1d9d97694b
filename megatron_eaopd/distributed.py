"""Process-group setup from torchrun or srun environments, and rank helpers.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; a bare
``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (the SLURM launcher exports
``MASTER_ADDR``/``MASTER_PORT``). Without either, the process is a world of one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_eaopd.platform import apply_cpu_compat

__all__ = [
    "DistEnv",
    "dist_env",
    "init_distributed",
    "init_model_parallel",
    "destroy",
    "is_rank0",
    "print_rank0",
    "seed_everything",
    "collective_device",
    "all_reduce_scalars",
]


@dataclass(frozen=True)
class DistEnv:
    """Ranks of this process as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def dist_env() -> DistEnv:
    """Read rank/world size from torchrun (``RANK``...) or SLURM (``SLURM_PROCID``...) variables."""
    env = os.environ
    if "RANK" in env:
        rank, world, local = int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    return DistEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistEnv:
    """Initialise ``torch.distributed`` (NCCL with CUDA, gloo otherwise) and the CPU layer.

    On a CPU-only machine this also applies :func:`megatron_eaopd.platform.apply_cpu_compat`.
    Idempotent: a second call returns the environment without re-initialising.

    Args:
        timeout_s: collective timeout in seconds.
        backend: override the backend ("nccl" or "gloo").
    Returns:
        The :class:`DistEnv` of this process.
    """
    env = dist_env()
    apply_cpu_compat()
    if dist.is_initialized():
        return env
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, **kwargs) -> None:
    """(Re)initialise Megatron's ``parallel_state`` with TP/PP/CP sizes; DP is what remains.

    Raises:
        ValueError: if ``tp * pp * cp`` does not divide the world size.
    """
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"tensor({tp}) x pipeline({pp}) x context({cp}) parallel = {tp * pp * cp} does not divide "
            f"the world size {world}; choose sizes whose product divides the number of processes"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, **kwargs
    )


def seed_everything(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (CUDA or its CPU stand-in)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    """True on global rank 0, or when not distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    """``print`` on global rank 0 only (flushes)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current CUDA device (NCCL), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_scalars(values: Mapping[str, float | torch.Tensor], *, group=None, contribute: bool = True,
                       op=dist.ReduceOp.SUM) -> dict[str, float]:
    """All-reduce named scalars in one fp64 collective and return them as Python floats.

    Args:
        values: name -> number (float or 0-dim tensor); every rank must pass the same names.
        group: process group (default: the whole world).
        contribute: False sends zeros (e.g. TP ranks holding a copy of another rank's numbers, so
            that each replica is counted once in a SUM).
        op: the reduction (SUM, MAX, ...).
    Returns:
        ``{name: reduced value}`` (the local values when torch.distributed is not initialised).
    """
    keys = list(values)
    dev = collective_device() if dist.is_initialized() else torch.device("cpu")
    vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(dev).reshape(()) for k in keys]) if keys \
        else torch.zeros(0, dtype=torch.float64, device=dev)
    if not contribute:
        vec = torch.zeros_like(vec)
    if dist.is_initialized():
        dist.all_reduce(vec, op=op, group=group)
    return dict(zip(keys, vec.cpu().tolist()))
