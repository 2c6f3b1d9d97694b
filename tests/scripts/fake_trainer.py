"""Stand-in for ``python -m megatron_eaopd.train`` in the SLURM launcher tests (tests/test_slurm.py).

It follows the trainer's process contract without any model, so the launcher, the rendezvous,
signals and requeue can be tested in seconds:

* ``--config RECIPE key.sub=value ...``; reads ``logging.run_dir``, ``train.iterations`` (default 8)
  and ``checkpoint.save_interval`` (default 0 = only at the end / on a signal) from the overrides;
* ranks from ``megatron_eaopd.distributed.dist_env`` (``SLURM_PROCID``/``SLURM_NTASKS`` +
  ``MASTER_ADDR``/``MASTER_PORT``) and a real gloo process group (an all-reduce checks the world);
* rank 0 appends one JSON line per iteration to ``<run_dir>/metrics.jsonl`` (``iteration`` field);
  every rank writes ``<run_dir>/ranks/rank<R>-restart<K>.json`` (what it saw of the rendezvous);
* checkpoints ``<run_dir>/checkpoints/iter_XXXXXXX/state.json`` + an atomic ``latest`` file;
  resumes from ``latest``;
* SIGUSR1/SIGTERM: the flag is agreed on by all ranks at the end of the iteration (MAX
  all-reduce), then a checkpoint is saved, ``preempted: checkpoint saved`` printed, exit code 0.

Seconds per iteration: env ``FAKE_ITER_S`` (default 0.3).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megatron_eaopd.distributed import dist_env  # noqa: E402

_stop = {"sig": 0}


def _handler(signum, frame):  # noqa: ARG001
    _stop["sig"] = signum


def _save(ckpt_dir: Path, iteration: int) -> None:
    d = ckpt_dir / f"iter_{iteration:07d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"iteration": iteration}))
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(d.name)
    tmp.replace(ckpt_dir / "latest")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, _handler)
    signal.signal(signal.SIGTERM, _handler)
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    assert "--config" in argv and Path(argv[argv.index("--config") + 1]).is_file(), f"bad --config in {argv}"
    run_dir = Path(overrides.get("logging.run_dir", "runs/fake"))
    iterations = int(overrides.get("train.iterations", 8))
    save_interval = int(overrides.get("checkpoint.save_interval", 0))
    iter_s = float(os.environ.get("FAKE_ITER_S", "0.3"))

    env = dist_env()
    dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size)
    t = torch.tensor([float(env.rank)])
    dist.all_reduce(t)
    expected = env.world_size * (env.world_size - 1) / 2
    assert t.item() == expected, (t.item(), expected)

    ckpt_dir = run_dir / "checkpoints"
    start = 0
    latest = ckpt_dir / "latest"
    if latest.exists():
        start = json.loads((ckpt_dir / latest.read_text().strip() / "state.json").read_text())["iteration"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank{env.rank}-restart{restart}.json").write_text(json.dumps({
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
        "master_addr": env.master_addr, "master_port": env.master_port,
        "node": os.environ.get("SLURMD_NODENAME"), "restart": restart, "resumed_from": start,
        "allreduce": t.item(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "container_image": os.environ.get("EAOPD_STUB_CONTAINER_IMAGE"),
        "container_mounts": os.environ.get("EAOPD_STUB_CONTAINER_MOUNTS"),
    }))
    if env.rank == 0:
        print(f"fake trainer: world {env.world_size}, resuming at iteration {start}" if start else
              f"fake trainer: world {env.world_size}, fresh start", flush=True)

    it = start
    while it < iterations:
        time.sleep(iter_s)
        it += 1
        if env.rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"iteration": it, "time": time.time(), "restart": restart}) + "\n")
        flag = torch.tensor([float(_stop["sig"])])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            if env.rank == 0:
                _save(ckpt_dir, it)
            dist.barrier()
            if env.rank == 0:
                print(f"preempted: checkpoint saved at iteration {it} (signal {int(flag.item())})", flush=True)
            dist.destroy_process_group()
            return 0
        if env.rank == 0 and save_interval and it % save_interval == 0:
            _save(ckpt_dir, it)
    if env.rank == 0:
        _save(ckpt_dir, it)
        print(f"fake trainer: finished {it} iterations", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
