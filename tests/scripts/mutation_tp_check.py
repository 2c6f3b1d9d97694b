"""Drives bench/mutation_tp.py's forking phase-2 runner with small worker mains (tests/test_mutation_tp.py).

Prints one JSON line: {case: [status, why]} for a passing world, a judge that fails, a rank that fails, a rank that
hangs while the other waits in a collective (ended by the timeout), and a rank that reports nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from mutation_tp import _run_one  # noqa: E402


def _report(**rec) -> None:
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def good():
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    _report(sum=float(t), world=dist.get_world_size(), mutant=os.environ["MUTANT_UNDER_TEST"])
    dist.destroy_process_group()


def rank1_fails():
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("mutated code raised")
    dist.all_reduce(torch.ones(1))  # fails once rank 1's connection closes
    _report(sum=0.0)


def rank1_hangs():
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(600)  # collectives out of step: rank 0 waits in its all-reduce
    dist.all_reduce(torch.ones(1))
    _report(sum=0.0)


def silent():
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        _report(sum=0.0)
    dist.barrier()


def judge(results, expect_mutant):
    for rank, recs in results.items():
        (rec,) = recs
        assert rec["sum"] == rec["world"] * (rec["world"] + 1) / 2, (rank, rec)
        assert rec["mutant"] == expect_mutant, (rank, rec)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {}
    t0 = time.monotonic()
    out["passes"] = _run_one(good, judge, ("m.x_f__mutmut_1",), 3, "m.x_f__mutmut_1", 60)
    out["judge_fails"] = _run_one(good, judge, ("m.x_f__mutmut_2",), 2, "m.x_f__mutmut_1", 60)
    out["fails"] = _run_one(rank1_fails, judge, ("",), 2, "m.x_f__mutmut_3", 60)
    t1 = time.monotonic()
    out["hang"] = _run_one(rank1_hangs, judge, ("",), 2, "m.x_f__mutmut_3", 5)
    out["hang_seconds"] = [round(time.monotonic() - t1, 1)]
    try:  # every forked rank was reaped: none left running ((0, 0)) or as a zombie ((pid, status))
        os.waitpid(-1, os.WNOHANG)
        out["children_left"] = [True]
    except ChildProcessError:  # no child process at all
        out["children_left"] = [False]
    out["silent"] = _run_one(silent, judge, ("",), 2, "m.x_f__mutmut_4", 60)
    print("RESULT " + json.dumps(out), flush=True)
