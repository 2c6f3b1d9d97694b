"""Trainer benchmark: time per phase of the CPU demo's iteration and the loss's share of a training step.

    python bench/bench_trainer.py [--iterations 3] [--run-dir runs/bench_trainer]

Runs the demo recipe (SmolLM2-135M teacher, 10-layer student, GSM8K prompts) for a few iterations
through ``megatron_eaopd.demo`` (the same command users run), reads the per-iteration phase times
from ``metrics.jsonl``, then times ``eopd_loss`` forward+backward alone on logits of the same shape
and count as one iteration's update phase feeds it (micro-batches of ``[1, S-1, 49152]`` at the
measured sequence length). The loss's share = loss time / update-phase time (target <= 5%).
Writes ``bench/results/trainer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def loss_time(n_micro: int, seq: int, vocab: int, top_k: int, repeats: int = 2) -> float:
    """Seconds of eopd_loss forward+backward over ``n_micro`` micro-batches of ``[1, seq, vocab]``."""
    from megatron_eaopd.loss import EOPDConfig, eopd_loss, teacher_signals

    cfg = EOPDConfig(top_k=top_k)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, seq, vocab, generator=g) * 3 for _ in range(n_micro)]
    teacher = torch.randn(1, seq, vocab, generator=g) * 3
    target = torch.randint(0, vocab, (1, seq), generator=g)
    sig = teacher_signals(teacher, target, cfg)
    old = torch.full((1, seq), -5.0)
    mask = torch.ones(1, seq)
    best = float("inf")
    for _ in range(repeats):
        xs = [x.clone().requires_grad_(True) for x in logits]
        t0 = time.perf_counter()
        for x in xs:
            loss, _, _ = eopd_loss(x, sig, old, mask, cfg)
            loss.backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_trainer"))
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "trainer.json"))
    a = ap.parse_args()
    env = {**os.environ, "EAOPD_PROGRESS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_eaopd.demo", "--run-dir", a.run_dir, "--fresh",
                           "--iterations", str(a.iterations)], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(a.run_dir) / "train_np1_dp" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] if len(rows) > 1 else rows  # the first iteration includes engine construction
    phase = {k: statistics.mean(r[k] for r in steady) for k in ("time_rollout", "time_teacher", "time_train", "time_iteration")}
    # the update phase's loss work: one micro-batch per sequence (demo: micro_batch_size 2 -> 2 per step,
    # 2 steps), sequence length = prompt + response; the demo's prompts are ~110-200 tokens + 48 new
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "demo_cpu.yaml").read_text())
    n_seq = recipe["train"]["prompts_per_iteration"] * recipe["rollout"]["n"]
    seq = 200 + recipe["rollout"]["max_new_tokens"]
    lt = loss_time(n_seq, seq, 49152, recipe["loss"]["top_k"])
    result = dict(
        benchmark="trainer", device="cpu", threads=torch.get_num_threads(), iterations=len(rows), wall_seconds=wall,
        phase_seconds_mean=phase, tokens_per_second_mean=statistics.mean(r["tokens_per_second"] for r in steady),
        loss_fwd_bwd_seconds=lt, loss_shape=[n_seq, seq, 49152],
        loss_share_of_update=lt / phase["time_train"], target_loss_share="<= 0.05",
        note="update phase = old log-probs forward + mini-batch forward/backward/optimizer steps; loss timed "
             "separately on the same number of [1, S, V] micro-batches at an upper-bound S",
    )
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"RESULT rollout {phase['time_rollout']:.1f}s teacher {phase['time_teacher']:.1f}s train {phase['time_train']:.1f}s "
          f"| loss {lt:.2f}s = {100 * lt / phase['time_train']:.1f}% of the update phase")


if __name__ == "__main__":
    main()
