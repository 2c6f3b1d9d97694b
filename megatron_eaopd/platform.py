"""CPU compatibility layer for megatron-core.

megatron-core assumes CUDA in many places (``torch.cuda.current_device()`` as an allocation
device, the CUDA RNG tracker, literal ``device="cuda"``, ``param.type() ==
'torch.cuda.FloatTensor'`` asserts, ``torch.cuda.Event`` timing, NVTX ranges). This module is
the *only* place in the package that knows a CPU is standing in for a GPU.

:func:`apply_cpu_compat` is a no-op when CUDA is available: the GPU path never sees any of
this. On a CPU-only machine it installs, once per process:

* ``torch.cuda.current_device`` -> ``"cpu"``; ``synchronize``/NVTX -> no-ops; a
  ``perf_counter`` stand-in for ``torch.cuda.Event`` and a no-op ``current_stream()`` (megatron-core
  0.19's DDP gradient sync waits on it);
* the CUDA RNG state functions (and Megatron's ``_get/_set_cuda_rng_state``) -> the CPU
  generator, so ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work;
* a process-wide ``TorchFunctionMode`` that rewrites CUDA ``device=`` arguments, ``.cuda()``
  and ``.to("cuda")`` to CPU, drops ``pin_memory=True`` and reports the zero-argument
  ``Tensor.type()`` as ``torch.cuda.*`` (Megatron's optimizer and ``clip_grads`` assert it);
* a fix for gloo ``dist.scatter``, which silently sends wrong data for non-contiguous inputs
  (torch 2.13): the inputs are made contiguous first.

What runs on CPU and the traps behind each item: ``docs/cpu.md``.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_compat", "cpu_compat_active", "default_device"]

_ACTIVE = False
_MODE: TorchFunctionMode | None = None


def default_device() -> torch.device:
    """The device this process computes on: the current CUDA device, or CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_compat_active() -> bool:
    """True once :func:`apply_cpu_compat` has patched this process."""
    return _ACTIVE


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _HostEvent:
    """``torch.cuda.Event`` stand-in timing with ``time.perf_counter`` (milliseconds)."""

    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, *args, **kwargs):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other: "_HostEvent") -> float:
        return (other.t - self.t) * 1000.0


class _HostStream:
    """``torch.cuda.current_stream()`` stand-in: CPU work is synchronous, so waits are no-ops."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        event = event or _HostEvent()
        event.record()
        return event


def apply_cpu_compat() -> bool:
    """Patch this process so megatron-core runs on CPU (gloo). No-op when CUDA is available.

    Safe to call many times; only the first call on a CUDA-less machine does anything.

    Returns:
        True if the CPU layer is active after the call (i.e. CUDA is absent), else False.
    """
    global _ACTIVE, _MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    _ACTIVE = True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.Event = _HostEvent
    torch.cuda.current_stream = lambda *a, **k: _HostStream()
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    torch.cuda.nvtx.mark = lambda *a, **k: None
    torch.cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()

    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    import torch.distributed as dist

    scatter = dist.scatter

    def _contiguous_scatter(tensor, scatter_list=None, *args, **kwargs):
        if scatter_list is not None:
            scatter_list = [t.contiguous() for t in scatter_list]
        return scatter(tensor, scatter_list, *args, **kwargs)

    dist.scatter = _contiguous_scatter

    _MODE = _CudaAsCpu()
    _MODE.__enter__()  # stays active for the life of the process
    return True
