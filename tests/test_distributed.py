"""megatron_eaopd.distributed: the collective device (NCCL needs CUDA tensors, gloo CPU ones), the
one-call start-up of a single-process world, and unwrap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_eaopd import distributed as md

ROOT = Path(__file__).resolve().parents[1]


def test_collective_device_cpu_machine():
    assert not torch.cuda.is_available()  # this suite's CPU path; the GPU path is faked below
    assert md.collective_device() == torch.device("cpu")


@pytest.mark.parametrize("backend, expected", [
    (None, torch.device("cuda", 3)),            # no process group yet: the current CUDA device
    ("nccl", torch.device("cuda", 3)),
    ("cpu:gloo,cuda:nccl", torch.device("cuda", 3)),
    ("gloo", torch.device("cpu")),              # gloo on a CUDA machine reduces CPU tensors
])
def test_collective_device_follows_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "is_initialized", lambda: backend is not None)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert md.collective_device() == expected


def test_init_world_single_process_opens_no_port():
    """Without launcher variables a world of one starts on an in-process store: no MASTER_PORT is chosen and
    no port is bound (two at once never collide), with Megatron's TP/PP groups and the seed set."""
    code = ("import json, os, torch, torch.distributed as d\n"
            "from megatron.core import parallel_state as ps\n"
            "from megatron_eaopd.distributed import init_world\n"
            "w = init_world(1, 1, seed=77)\n"
            "print(json.dumps({'world': w, 'port': os.environ.get('MASTER_PORT'), 'backend': d.get_backend(),\n"
            "  'store': type(d.distributed_c10d._get_default_store().underlying_store).__name__,\n"
            "  'tp': ps.get_tensor_model_parallel_world_size(), 'dp': ps.get_data_parallel_world_size(),\n"
            "  'seed': torch.initial_seed()}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    recs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for r in recs:
        assert (r["world"], r["backend"], r["tp"], r["dp"], r["seed"]) == (1, "gloo", 1, 1, 77), r
        assert (r["port"], r["store"]) == (None, "HashStore"), r


@pytest.mark.parametrize("tp, pp, needle", [(0, 1, "must be >= 1"), (1, -1, "must be >= 1"),
                                            (2, 1, "does not divide the world size 1")])
def test_init_world_rejects_bad_sizes(monkeypatch, tp, pp, needle):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=needle):
        md.init_world(tp, pp)


def test_unwrap_strips_module_chains():
    inner = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert md.unwrap(Wrap(Wrap(inner))) is inner and md.unwrap(inner) is inner
    from megatron_eaopd.models.provider import unwrap as provider_unwrap  # the old home still works

    assert provider_unwrap is md.unwrap
