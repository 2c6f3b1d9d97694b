"""Phase 2 of the mutation run (bench/mutation.py) from one warm interpreter.

A torchrun test costs a fresh interpreter per rank (importing torch and megatron-core: ~10 s of CPU each)
before it computes anything. Here one process imports the mutated ``loss/`` (``mutants/``), the test's
worker script and its judge once, then for each mutant forks the ranks, which set ``MUTANT_UNDER_TEST``
and the launcher variables torchrun would set, run the script's ``main()`` on a gloo world of their own
(a fresh TCP store per mutant) and write their records; the parent applies the same assertions as the
pytest test (``check_*_results`` in the test module) to them. This is how mutmut's phase 1 works (forks
from an interpreter that has imported torch once); the parent never runs a collective, and runs torch with
one thread, so forking it is safe.

A mutant is killed when a rank fails, a rank hangs past the timeout (collectives out of step), a rank
reports nothing, or the assertions fail; it survives when every assertion holds.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

#: test id -> (worker script module in tests/scripts, ranks, test module, judge function, judge's extra args)
FORKABLE = {
    "tests/test_loss.py::test_tensor_parallel_against_fp64_reference[2]":
        ("loss_tp", 2, "test_loss", "check_tensor_parallel_results", (2,)),
    "tests/test_loss.py::test_tensor_parallel_against_fp64_reference[4]":
        ("loss_tp", 4, "test_loss", "check_tensor_parallel_results", (4,)),
    "tests/test_objectives.py::test_quantile_gathers_every_rank[3]":
        ("quantile_tp", 3, "test_objectives", "check_quantile_results", (3,)),
    "tests/test_objectives.py::test_variants_tensor_and_data_parallel[2]":
        ("objectives_tp", 2, "test_objectives", "check_variants_results", ()),
}


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(main: Callable[[], None], rank: int, world: int, port: int, mutant: str, result_dir: str) -> None:
    """In a forked child: become rank ``rank`` of a fresh gloo world and run the worker script; never returns."""
    code = 1
    try:
        if sys.platform == "linux":  # die with the driver: a killed driver leaves no rank waiting in a collective
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        log = os.open(os.path.join(result_dir, f"log{rank}.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RESULT_DIR=result_dir,
                          MUTANT_UNDER_TEST=mutant)
        main()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_one(main, judge, args, world: int, mutant: str, timeout: float) -> tuple[str, str]:
    """Fork ``world`` ranks running ``main`` with ``mutant`` active; returns (``killed``|``survived``, why)."""
    result_dir = tempfile.mkdtemp(prefix="mutation_tp_")
    try:
        port = _free_port()
        pids = []
        for r in range(world):
            pid = os.fork()
            if pid == 0:
                _rank(main, r, world, port, mutant, result_dir)
            pids.append(pid)
        deadline = time.monotonic() + timeout
        codes: dict[int, int] = {}
        while len(codes) < world and time.monotonic() < deadline:
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        if len(codes) < world:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            return "killed", f"timeout after {timeout:.0f} s"
        if any(codes.values()):
            return "killed", f"rank exit codes {[codes[p] for p in pids]}"
        results = {}
        for r in range(world):
            path = Path(result_dir) / f"rank{r}.jsonl"
            recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
            if not recs:
                return "killed", f"rank {r} reported nothing"
            results[r] = recs
        try:
            judge(results, *args)
        except AssertionError as e:
            return "killed", f"assertion: {str(e)[:200]}"
        except Exception as e:  # a record of the wrong shape counts as a failing test too
            return "killed", f"{type(e).__name__}: {str(e)[:200]}"
        return "survived", ""
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)


def run_forked(test: str, mutants: list[str], root: Path, timeout: float,
               on_result: Callable[[str, str, str], None]) -> None:
    """Run the torchrun ``test`` (a key of :data:`FORKABLE`) against each of ``mutants`` from this process,
    which must not have imported ``megatron_eaopd`` (it imports the mutated copy under ``root/mutants``).
    Calls ``on_result(mutant, status, why)`` after each."""
    script, world, test_module, judge_name, args = FORKABLE[test]
    mroot = root / "mutants"
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", MUTANT_UNDER_TEST="")
    os.chdir(mroot)
    for p in (mroot / "tests" / "scripts", mroot / "tests", mroot):
        sys.path.insert(0, str(p))
    import torch

    torch.set_num_threads(1)
    import megatron.core.parallel_state  # noqa: F401  (warm: the workers import it inside main())

    import megatron_eaopd

    assert Path(megatron_eaopd.__file__).resolve().is_relative_to(mroot.resolve()), megatron_eaopd.__file__
    main = importlib.import_module(script).main
    judge = getattr(importlib.import_module(test_module), judge_name)
    status, why = _run_one(main, judge, args, world, "", timeout)  # the unmutated code must pass
    if status != "survived":
        raise SystemExit(f"phase 2: {test} fails without a mutant ({why}); fix the test first")
    for m in mutants:
        status, why = _run_one(main, judge, args, world, m, timeout)
        on_result(m, status, why)


if __name__ == "__main__":  # python bench/mutation_tp.py TEST TIMEOUT MUTANT... : one JSON line per mutant
    _test, _timeout, *_mutants = sys.argv[1:]
    run_forked(_test, _mutants, Path(__file__).resolve().parents[1], float(_timeout),
               lambda m, st, why: print(json.dumps({"mutant": m, "status": st, "why": why}), flush=True))
