"""The data-parallel gather behind ``tau_quantile`` (megatron_eaopd/loss/quantile.py), on a gloo world.

    torchrun --nproc-per-node N tests/scripts/quantile_tp.py      (N >= 2)

Rank r holds r + 1 values (rank 0 also an empty call): all_gather_values must return every rank's values in
rank order (float64, on the CPU), global_quantile the quantile of all of them on every rank; over a group of
this rank alone both see only the local values, over ranks 1..N-1 only theirs. Reports the gathered values and
quantiles per rank.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _report import report  # noqa: E402
from megatron_eaopd.loss.quantile import all_gather_values, global_quantile  # noqa: E402


def values_of(rank: int) -> torch.Tensor:
    """Rank r's r + 1 values (float32, not representable exactly in fewer bits than float32)."""
    return (torch.arange(rank + 1, dtype=torch.float32) * 0.37 + rank * 1.1 + 0.013).reshape(rank + 1)


def main():
    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    single = [dist.new_group([r]) for r in range(world)][rank]
    mine = values_of(rank)
    gathered = all_gather_values(mine, dist.group.WORLD)
    report(check="gather", dtype=str(gathered.dtype), device=str(gathered.device), values=gathered.tolist())
    report(check="gather_single", values=all_gather_values(mine, single).tolist())
    report(check="gather_default", values=all_gather_values(mine).tolist())
    empty = torch.zeros(0) if rank == 0 else mine  # a rank without a valid token still takes part
    report(check="gather_empty", values=all_gather_values(empty, dist.group.WORLD).tolist())
    report(check="quantile", q=[global_quantile(mine, q, dist.group.WORLD) for q in (0.0, 0.3, 1.0)],
           single=global_quantile(mine, 0.3, single), default=global_quantile(mine, 0.3))
    # a data-parallel group that is neither the world nor one rank (ranks 1..world-1): the gather must stay in it
    sub = dist.new_group(list(range(1, world)))
    if rank >= 1:
        report(check="gather_sub", values=all_gather_values(mine, sub).tolist(), q=global_quantile(mine, 0.3, sub))
    dist.barrier()


if __name__ == "__main__":
    main()
