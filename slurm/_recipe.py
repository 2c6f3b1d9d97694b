#!/usr/bin/env python
"""Check a recipe (+ overrides) against a SLURM allocation before any GPU process starts.

Used by ``slurm/launch.sh``; prints ``KEY=VALUE`` shell assignments on success, or ``error: ...``
on stderr with exit code 1. Checks, using the trainer's own schema (``megatron_eaopd.config``):

* the recipe loads and validates (unknown keys, bad values: the schema's own messages);
* the world (``--world``) fits the layout: ``tp*pp`` and ``teacher_tp*teacher_pp`` divide it and the
  mini-batch splits over DP (``Config.resolve_runtime``), and TP does not span nodes;
* one process per GPU: ``--tasks-per-node`` equals ``--gpus-per-node`` (unless ``--allow-cpu``);
* with ``--check-paths``, EVERY path the recipe names, before the job starts its processes (all
  problems are reported at once): ``student/teacher.checkpoint`` (a Megatron checkpoint of this
  project), ``student/teacher.hf_path`` (a local HF folder, or a hub id found in the local Hugging Face
  cache: the error names ``hf download <id>``; with weights when no checkpoint is given),
  ``student/teacher.tokenizer``, ``data.train_files`` and ``eval.files`` (local files; ``org/name``
  and ``hf://`` are dataset names). Models resolve through
  :func:`megatron_eaopd.models.sources.resolve_model_source`, as the trainer does.

Usage::

    python slurm/_recipe.py RECIPE --world 16 --nodes 2 --tasks-per-node 8 --gpus-per-node 8 \\
        [--allow-cpu] [--check-paths] [-- key.sub=value ...]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _is_local_data(f: str) -> bool:
    """A data entry that names a local file (``megatron_eaopd.data.load_records``' rule), not a dataset name."""
    return "://" not in f and (f.endswith((".jsonl", ".json", ".parquet")) or not (("/" in f) and not f.startswith((".", "/"))))


def path_problems(cfg) -> list[str]:
    """Every path of a loaded :class:`megatron_eaopd.config.Config` that cannot be used, as messages."""
    from megatron_eaopd.models.sources import ModelSourceError, resolve_model_source

    problems = []
    for role in ("student", "teacher"):
        m = getattr(cfg, role)
        checks = []
        if m.checkpoint:
            checks.append((f"{role}.checkpoint", m.checkpoint, ("megatron",), "weights"))
        elif m.hf_path:  # the weights when there is no checkpoint (a checkpoint carries its own HF assets)
            checks.append((f"{role}.hf_path", m.hf_path, ("hf_dir", "hub"), "weights"))
        if getattr(m, "tokenizer", None):
            checks.append((f"{role}.tokenizer", m.tokenizer, ("megatron", "hf_dir", "hub"), "tokenizer"))
        for key, value, kinds, need in checks:
            try:
                resolve_model_source(value, key=key, kinds=kinds, need=need)
            except ModelSourceError as e:
                msg = str(e)
                if key.endswith(".checkpoint") and "does not exist" in msg:
                    msg += (f"; convert the HF model first (sbatch slurm/convert.sh HF_DIR:{value}, or "
                            f"python tools/convert_hf.py import --hf HF_DIR --out {value})")
                problems.append(msg)
    for key, files in (("data.train_files", cfg.data.train_files), ("eval.files", cfg.eval.files)):
        for f in files:
            if _is_local_data(f) and not Path(f).is_file():
                problems.append(f"{key}: {f!r} does not exist (relative paths resolve against {Path.cwd()})")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--tasks-per-node", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--allow-cpu", action="store_true")
    p.add_argument("--check-paths", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 1

    try:  # deferred: a host Python without the project's packages gets this message, not a traceback
        from megatron_eaopd.config import ConfigError, load_config
        if a.check_paths:
            import megatron_eaopd.models.sources  # noqa: F401  (path_problems uses it)
    except Exception as e:  # noqa: BLE001
        return fail(f"cannot import megatron_eaopd.config with {sys.executable} ({e}); set PYTHON= to the "
                    "project's environment (or CONTAINER= to an image that has it)")
    if not Path(a.recipe).is_file():
        return fail(f"recipe {a.recipe!r} not found (run sbatch from the repository root)")
    try:
        cfg = load_config(a.recipe, a.overrides)
    except ConfigError as e:
        return fail(f"{a.recipe}: {e}")

    # --allow-cpu: a CPU run (gloo) even where Slurm hands out (possibly fake) GPUs
    cuda = a.gpus_per_node > 0 and not a.allow_cpu
    if not cuda and not a.allow_cpu:
        return fail("no GPUs on this node (SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES / nvidia-smi): request "
                    "them with --gpus-per-node (or --gres=gpu:N); ALLOW_CPU=1 runs on CPU with gloo (tests only)")
    if cuda and a.tasks_per_node > a.gpus_per_node:
        return fail(f"{a.tasks_per_node} tasks per node but only {a.gpus_per_node} GPUs per node: the launcher "
                    "starts one process per GPU; use --ntasks-per-node equal to --gpus-per-node")
    if cuda and a.tasks_per_node < a.gpus_per_node:
        print(f"warning: {a.gpus_per_node - a.tasks_per_node} of the {a.gpus_per_node} GPUs per node stay idle "
              f"({a.tasks_per_node} tasks per node)", file=sys.stderr)
    if a.world != a.nodes * a.tasks_per_node:
        return fail(f"world size {a.world} != nodes {a.nodes} x tasks per node {a.tasks_per_node}: use "
                    "--nodes and --ntasks-per-node (not --ntasks) so every node runs the same number of ranks")
    try:
        layout = cfg.resolve_runtime(a.world, cuda)
    except ConfigError as e:
        return fail(f"{e} ({a.nodes} node(s) x {a.tasks_per_node} = {a.world} processes for {a.recipe}; "
                    "change --nodes/--gpus-per-node or the recipe's parallel section)")
    par = cfg.parallel
    for name, tp in (("parallel.tp", par.tp), ("parallel.teacher_tp", par.resolved_teacher_tp)):
        if cuda and tp > a.tasks_per_node:
            return fail(f"{name} = {tp} exceeds the {a.tasks_per_node} GPUs of one node: tensor parallelism "
                        "across nodes is far too slow; use pipeline parallelism (parallel.pp) across nodes")
    if a.check_paths:
        problems = path_problems(cfg)
        if problems:
            return fail(f"{len(problems)} path(s) of {a.recipe} cannot be used:\n  " + "\n  ".join(problems))

    out = {
        "RECIPE_TP": par.tp,
        "RECIPE_PP": par.pp,
        "RECIPE_TEACHER_TP": par.resolved_teacher_tp,
        "RECIPE_TEACHER_PP": par.resolved_teacher_pp,
        "RECIPE_DP": layout.dp,
        "RECIPE_ITERATIONS": cfg.train.iterations if cfg.train.iterations is not None else "",
        "RECIPE_RUN_DIR": cfg.logging.run_dir,
        "RECIPE_CKPT_DIR": str(cfg.checkpoint_dir()),
        "RECIPE_STUDENT": cfg.student.checkpoint or cfg.student.hf_path or "",
        "RECIPE_TEACHER": cfg.teacher.checkpoint or cfg.teacher.hf_path or "",
    }
    for k, v in out.items():
        print(f"{k}={shlex.quote(str(v))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
