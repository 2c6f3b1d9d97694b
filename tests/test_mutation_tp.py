"""bench/mutation_tp.py: the mutation run's phase 2 forks the ranks of a torchrun test from one interpreter
and judges their records with the test's own assertions; a failing, hanging or silent rank kills the mutant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_forked_ranks_are_judged_like_the_torchrun_test():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "mutation_tp_check.py")],
                       capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    # 3 forked ranks on their own gloo world, the mutant's name in their environment: the judge holds
    assert out["passes"] == ["survived", ""], out
    # the judge expects another mutant name: its assertion kills the mutant
    assert out["judge_fails"][0] == "killed" and out["judge_fails"][1].startswith("assertion"), out
    # rank 1 raises: its exit code kills the mutant (rank 0's all-reduce fails as its peer is gone, or waits
    # until the timeout on a slow machine)
    assert out["fails"][0] == "killed" and out["fails"][1] in ("rank exit codes [1, 1]", "timeout after 60 s"), out
    # rank 1 hangs while rank 0 waits in an all-reduce: ended by the 5 s timeout, both ranks killed and reaped
    assert out["hang"] == ["killed", "timeout after 5 s"] and out["hang_seconds"][0] < 30, out
    assert out["children_left"] == [False], out
    # a rank that writes no record fails like the torchrun fixture's "rank 1 reported no RESULT lines"
    assert out["silent"] == ["killed", "rank 1 reported nothing"], out
