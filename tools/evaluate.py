#!/usr/bin/env python
"""Evaluate a model (or replayed outputs) on math benchmarks: Avg@n / Pass@k with math-verify.

Defaults are the paper's protocol (method.md "Evaluation"): n=8 samples, temperature 1.0, top-p 0.8,
8192 new tokens, the six benchmarks MATH500 AMC23 Minerva OlympiadBench AIME24 AIME25.

Examples::

    python tools/evaluate.py --model ckpt/ --data-dir data/ --out eval/run1
    python tools/evaluate.py --replay outputs.jsonl --data-dir data/ --benchmarks MATH500 --out eval/r

Writes ``samples.jsonl``, ``summary.json`` and ``table.md`` under ``--out``; rerunning the same
command resumes (problems already complete in ``samples.jsonl`` are skipped).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eaopd.evaluation.runner import (  # noqa: E402
    STANDARD_BENCHMARKS,
    EvalConfig,
    Generator,
    ReplayGenerator,
    resolve_benchmarks,
    run_evaluation,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (paper defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Megatron checkpoint dir or Hugging Face model folder")
    src.add_argument("--replay", help="grade existing outputs from a JSONL (prompt|problem, text[, sample, "
                                      "num_tokens, truncated]) instead of generating")
    p.add_argument("--data-dir", help="folder with math500.jsonl amc23.jsonl minerva_math.jsonl "
                                      "olympiadbench.jsonl aime24.jsonl aime25.jsonl")
    p.add_argument("--benchmarks", nargs="+", default=list(STANDARD_BENCHMARKS),
                   help=f"standard names ({', '.join(STANDARD_BENCHMARKS)}, or 'all') or JSONL paths")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values (default: n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for generation")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--batch-problems", type=int, default=64, help="problems per generate() call")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (thinking disabled)")
    p.add_argument("--grading-workers", type=int, default=2)
    p.add_argument("--grading-timeout", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_model_generator(args: argparse.Namespace) -> Generator:
    """Construct the model-backed Generator (``megatron_eaopd.rollout.MegatronGenerator``).

    Raises: RuntimeError when ``megatron_eaopd.rollout`` cannot be imported, or (for now) because
        loading a checkpoint into a Rollout for evaluation is not wired up yet: use ``--replay``.
    """
    try:
        from megatron_eaopd.rollout import MegatronGenerator, Rollout  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"model generation needs megatron_eaopd.rollout, which failed to import ({e}); "
                           f"grade existing outputs with --replay FILE instead") from e
    # Single placeholder: building the GPTModel from --model (Megatron checkpoint or HF folder) with
    # TP=args.tp / PP=args.pp, then MegatronGenerator(Rollout(model, tokenizer), args.max_new_tokens,
    # args.temperature, args.top_p, chat_template=args.chat_template,
    # chat_template_kwargs={"enable_thinking": False}) is added by a later change.
    raise RuntimeError(f"loading {args.model!r} for generation is not wired into tools/evaluate.py yet; "
                       f"grade existing outputs with --replay FILE")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 on a usage/data error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        benchmarks = resolve_benchmarks(args.benchmarks, args.data_dir)
        cfg = EvalConfig(n=args.n, ks=args.k, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit,
                         batch_problems=args.batch_problems, grading_workers=args.grading_workers,
                         grading_timeout=args.grading_timeout, progress=not args.no_progress)
        cfg.resolved_ks()
        gen = ReplayGenerator(args.replay) if args.replay else build_model_generator(args)
        summary = run_evaluation(gen, benchmarks, args.out, cfg, model_name=args.model or args.replay)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text())
    print(f"mean Avg@{cfg.n} {summary['mean']['avg']:.2f}; wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
