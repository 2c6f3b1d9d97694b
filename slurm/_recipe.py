#!/usr/bin/env python
"""Check a recipe (+ overrides) against a SLURM allocation before any GPU process starts.

Used by ``slurm/launch.sh``; prints ``KEY=VALUE`` shell assignments on success, or ``error: ...``
on stderr with exit code 1. Checks, using the trainer's own schema (``megatron_eaopd.config``):

* the recipe loads and validates (unknown keys, bad values: the schema's own messages);
* the world (``--world``) fits the layout: ``tp*pp`` and ``teacher_tp*teacher_pp`` divide it and the
  mini-batch splits over DP (``Config.resolve_runtime``), and TP does not span nodes;
* one process per GPU: ``--tasks-per-node`` equals ``--gpus-per-node`` (unless ``--allow-cpu``);
* the Megatron checkpoints named by ``student.checkpoint`` / ``teacher.checkpoint`` exist
  (``--check-paths``), and the training files exist.

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

    try:
        from megatron_eaopd.config import ConfigError, load_config
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
        for name, path in (("student.checkpoint", cfg.student.checkpoint), ("teacher.checkpoint", cfg.teacher.checkpoint)):
            if path and not Path(path).exists():
                return fail(f"{name} = {path!r} does not exist: convert the HF model first "
                            f"(sbatch slurm/convert.sh, or python tools/convert_hf.py import --hf DIR --out {path})")
        for f in cfg.data.train_files:  # local files only; "org/name" / "hf://" are dataset names
            local = f.endswith((".jsonl", ".json", ".parquet")) and "://" not in f
            if local and not Path(f).exists():
                return fail(f"data.train_files: {f!r} does not exist")

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
