"""Shared pytest fixtures: the multi-rank launcher, GPU skipping, and no silent skips in CI.

Multi-rank tests run a script under ``torchrun --nproc-per-node N`` (gloo on CPU, a fresh free
port each time); every rank records JSON results through ``tests/scripts/_report.py`` (one file per
rank), and the fixture returns them grouped by rank so the test can assert on real values.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The workspace's shared data (beside the checkout, as CI lays it out); tests only, never the product.
SHARED_DATA = next((p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
                   ROOT.parent / "shared" / "data")
SCRIPTS = Path(__file__).resolve().parent / "scripts"
# torchrun scripts double as importable modules for the in-process (TP = 1) variants of their checks
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

# EAOPD_STRICT_SKIPS=1 (CI, make test): a skipped non-GPU test fails with its reason (tests/strict_skips.py)
from strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, *args: str, env: dict | None = None, timeout: float = 300.0):
    """Run ``script`` under torchrun with ``nproc`` gloo ranks; return ``{rank: [result dicts]}``.

    Raises AssertionError with the full output if the run fails or a rank reports nothing.
    """
    script = Path(script)
    if not script.is_absolute():
        script = SCRIPTS / script
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}",
        str(script), *args,
    ]
    result_dir = tempfile.mkdtemp(prefix="torchrun_results_")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(SCRIPTS), os.environ.get("PYTHONPATH")])), "PYTHONWARNINGS": "ignore",
                "RESULT_DIR": result_dir}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    out = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, f"torchrun {script.name} failed (rc={proc.returncode}):\n{out[-8000:]}"
    results: dict[int, list[dict]] = {r: [] for r in range(nproc)}
    for r in range(nproc):
        path = Path(result_dir) / f"rank{r}.jsonl"
        if path.exists():
            results[r] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    shutil.rmtree(result_dir, ignore_errors=True)
    for r, recs in results.items():
        assert recs, f"rank {r} reported no RESULT lines:\n{out[-8000:]}"
    return results


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random teacher (4 layers) / student (2 layers) Megatron checkpoints with the SmolLM2 tokenizer
    (tests/scripts/trainer_models.py), built once per session."""
    out = tmp_path_factory.mktemp("trainer_models")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "trainer_models.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
