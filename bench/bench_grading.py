#!/usr/bin/env python
"""Grading throughput: every problem of the six eval benchmarks, gold answer vs ``\\boxed{gold}``.

Measures answers graded per second with a 2-worker GradingPool (math-verify in worker processes,
hard per-item timeout) and the fraction of gold-vs-gold pairs marked correct (should be ~100%;
failures are listed). Writes ``bench/results/grading.json``.

Usage: python bench/bench_grading.py --data-dir DATA [--workers 2] [--timeout 10]

``DATA`` holds the six benchmark files (math500.jsonl, amc23.jsonl, ...; see tools/evaluate.py --data-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_eaopd.evaluation.grading import GradingPool  # noqa: E402
from megatron_eaopd.evaluation.runner import STANDARD_BENCHMARKS, load_benchmark  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the six benchmark JSONL files")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grading.json"))
    args = ap.parse_args()

    items = []
    for name, fname in STANDARD_BENCHMARKS.items():
        for r in load_benchmark(Path(args.data_dir) / fname):
            items.append((name, r.id, r.answer))
    pairs = [(a, f"The final answer is $\\boxed{{{a}}}$.") for _, _, a in items]
    with GradingPool(workers=args.workers, timeout=args.timeout) as pool:
        t_start = time.perf_counter()
        pool.grade(pairs[:4])  # warm-up (worker imports), not timed
        t0 = time.perf_counter()
        res = pool.grade(pairs)
        dt = time.perf_counter() - t0
        restarts = pool.n_restarts
    per_bench: dict[str, dict] = {}
    failures = []
    for (name, pid, ans), r in zip(items, res):
        b = per_bench.setdefault(name, {"problems": 0, "correct": 0, "timeouts": 0, "errors": 0})
        b["problems"] += 1
        b["correct"] += r.correct
        b["timeouts"] += r.timed_out
        b["errors"] += r.error is not None
        if not r.correct:
            failures.append({"benchmark": name, "id": pid, "answer": ans, "extracted": r.extracted,
                             "timed_out": r.timed_out, "error": r.error})
    for b in per_bench.values():
        b["pct_correct"] = 100.0 * b["correct"] / b["problems"]
    n = len(items)
    out = {
        "what": "math-verify gold-vs-gold grading, answer wrapped as 'The final answer is $\\boxed{gold}$'",
        "workers": args.workers, "timeout_s": args.timeout, "items": n,
        "seconds": dt, "answers_per_second": n / dt,
        "pct_correct": 100.0 * sum(r.correct for r in res) / n,
        "timeouts": sum(r.timed_out for r in res), "worker_restarts": restarts,
        "per_benchmark": per_bench, "failures": failures,
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "startup_and_warmup_seconds": t0 - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{n} answers in {dt:.1f} s = {n / dt:.1f}/s with {args.workers} workers; "
          f"{out['pct_correct']:.2f}% gold-vs-gold correct; {len(failures)} failures; wrote {args.out}")
    for f in failures:
        print("  FAIL", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
