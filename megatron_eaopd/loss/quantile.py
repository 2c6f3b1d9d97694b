"""An exact quantile of values spread over micro-batches and data-parallel ranks (the ``tau_quantile`` gate).

Every rank gathers every value (an all-gather of the counts, then of the values padded to the largest
count), sorts them in float64 and interpolates linearly between order statistics, so every rank gets
the same number, whatever the split of the values into micro-batches and ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["exact_quantile", "all_gather_values", "global_quantile"]


def exact_quantile(values: torch.Tensor, q: float) -> float | None:
    """The q-quantile of ``values``: linear interpolation between order statistics (numpy's default
    ``"linear"`` method, Hyndman and Fan's type 7), in float64.

    Args:
        values: any shape (flattened), any float dtype; must be finite.
        q: in [0, 1].
    Returns:
        ``v_(i) + (v_(i+1) - v_(i)) * f`` with ``i + f = q (n - 1)`` over the sorted values; None if empty.
    Raises:
        ValueError: q outside [0, 1], or a NaN/inf value (names how many).
    """
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    v = values.detach().reshape(-1).double()
    n = v.numel()
    if n == 0:
        return None
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        raise ValueError(f"cannot take a quantile of {bad} non-finite values (of {n})")
    v = torch.sort(v).values
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    a, b = float(v[lo]), float(v[hi])
    return a + (b - a) * (pos - lo)


def _device(group) -> torch.device:
    """Where a collective over ``group`` needs its tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_values(values: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``values`` (1-D, sizes may differ), concatenated in rank order, on every rank of ``group``.

    Two collectives: an all-gather of the counts (int64) and one of the values padded to the largest
    count. Without an initialised process group, or a group of one rank, returns ``values``.

    Args:
        values: ``[n_r]`` this rank's values (any float dtype; sent as float64 so nothing is rounded).
        group: the process group (e.g. Megatron's data-parallel group); None = the whole world.
    Returns:
        ``[sum_r n_r]`` float64 on the CPU.
    """
    v = values.detach().reshape(-1).double()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return v.cpu()
    dev = _device(group)
    world = dist.get_world_size(group)
    n = torch.tensor([v.numel()], dtype=torch.int64, device=dev)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(max(counts), 1), dtype=torch.float64, device=dev)
    padded[: v.numel()] = v.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def global_quantile(values: torch.Tensor, q: float, group=None) -> float | None:
    """The exact q-quantile (:func:`exact_quantile`) of the values of every rank of ``group`` (collective).

    Returns:
        the same float on every rank, or None when no rank has a value.
    """
    return exact_quantile(all_gather_values(values, group), q)
