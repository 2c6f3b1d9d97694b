"""Evaluation: math-verify grading in worker processes, Avg@k / pass@k, and the benchmark runner.

Protocol: docs/method.md, "Evaluation protocol". Submodules: ``grading`` (last-\\boxed extraction, math-verify,
GradingPool with hard per-item timeouts), ``metrics`` (pass@k, Avg@k, means), ``runner`` (the
resumable benchmark pipeline, Generator protocol, scripted/replay generators, Markdown table),
``model_generator`` (load a Megatron checkpoint / HF folder at any TP/PP, sample through it, spread
calls over DP replicas), ``validation`` (``run_validation``: the same pipeline during training).
The last two import torch / megatron-core and are not imported here.
"""

from megatron_eaopd.evaluation.grading import GradeResult, GradingPool, grade_answers, grade_one, last_boxed
from megatron_eaopd.evaluation.metrics import avg_at_n, benchmark_metrics, mean_over_benchmarks, pass_at_k
from megatron_eaopd.evaluation.runner import (
    STANDARD_BENCHMARKS,
    EvalConfig,
    Generator,
    ReplayGenerator,
    Sample,
    ScriptedGenerator,
    format_table,
    load_benchmark,
    resolve_benchmarks,
    run_evaluation,
)

__all__ = [
    "GradeResult", "GradingPool", "grade_answers", "grade_one", "last_boxed",
    "avg_at_n", "benchmark_metrics", "mean_over_benchmarks", "pass_at_k",
    "STANDARD_BENCHMARKS", "EvalConfig", "Generator", "ReplayGenerator", "Sample", "ScriptedGenerator",
    "format_table", "load_benchmark", "resolve_benchmarks", "run_evaluation",
]
