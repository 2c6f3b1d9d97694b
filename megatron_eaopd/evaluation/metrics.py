"""Benchmark metrics: Avg@k, unbiased pass@k, response length, truncation rate, benchmark means.

Source: docs/method.md, "Evaluation protocol": Avg@8 = mean fraction of correct samples; Pass@8 = fraction of
problems with any correct sample; headline = unweighted mean over benchmarks; with n > k samples the
unbiased estimator pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language
Models Trained on Code"), computed as a stable product.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

__all__ = ["pass_at_k", "avg_at_n", "benchmark_metrics", "mean_over_benchmarks"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)``.

    Computed stably as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no huge binomials). When ``n == k``
    this is exactly "any of the n samples is correct".
    Args: n (int): samples drawn; c (int): correct samples, 0 <= c <= n; k (int): 1 <= k <= n.
    Returns: float in [0, 1]. Raises: ValueError on out-of-range arguments (incl. k > n).
    Source: Chen et al. 2021 (Codex), as specified in docs/method.md, "Evaluation protocol".
    """
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k} with n={n} samples per problem")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_n(n: int, c: int) -> float:
    """Fraction of correct samples for one problem, ``c / n`` (its mean over problems is Avg@n).

    Avg@k for any k <= n has the same expectation, so Avg@k reported with n samples is ``c/n``.
    Raises ValueError when not 0 <= c <= n or n < 1.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"avg@n needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    return c / n


def benchmark_metrics(per_problem: Sequence[Sequence[Mapping]], ks: Iterable[int]) -> dict:
    """Metrics of one benchmark from per-sample records grouped by problem.

    Args:
        per_problem: one list per problem of sample records, each with ``correct`` (bool),
            ``num_tokens`` (int, response length in tokens) and ``truncated`` (bool); every problem
            must have the same number n of samples.
        ks: the k values for pass@k (each 1 <= k <= n).
    Returns: dict with ``problems`` (int), ``n`` (int), ``avg`` (Avg@n, percent), ``pass@{k}``
        (percent, for each k), ``mean_length`` (tokens, mean over all samples), ``truncation_rate``
        (percent of samples cut at the length limit), ``timeouts`` (grading timeouts, count).
    Raises: ValueError for an empty benchmark, unequal sample counts, or k > n.
    """
    if not per_problem:
        raise ValueError("benchmark_metrics: no problems")
    ns = {len(s) for s in per_problem}
    if len(ns) != 1:
        raise ValueError(f"benchmark_metrics: problems have different sample counts {sorted(ns)}")
    n = ns.pop()
    ks = list(ks)
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is not in [1, n={n}]: cannot compute pass@{k} from {n} samples per problem")
    cs = [sum(bool(r["correct"]) for r in s) for s in per_problem]
    P = len(per_problem)
    out = {"problems": P, "n": n, "avg": 100.0 * sum(avg_at_n(n, c) for c in cs) / P}
    for k in ks:
        out[f"pass@{k}"] = 100.0 * sum(pass_at_k(n, c, k) for c in cs) / P
    samples = [r for s in per_problem for r in s]
    out["mean_length"] = sum(float(r.get("num_tokens", 0)) for r in samples) / len(samples)
    out["truncation_rate"] = 100.0 * sum(bool(r.get("truncated", False)) for r in samples) / len(samples)
    out["timeouts"] = sum(bool(r.get("timed_out", False)) for r in samples)
    return out


def mean_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, float]],
                         keys: Iterable[str] | None = None) -> dict:
    """Unweighted mean over benchmarks of each metric (docs/method.md: the headline number).

    Args: per_benchmark: ``{benchmark: metrics dict}`` (from ``benchmark_metrics``); keys: which
        metrics to average (default: ``avg``, every ``pass@k``, ``mean_length``, ``truncation_rate``
        present in all benchmarks). Returns: ``{key: mean}``. Raises ValueError when empty.
    """
    if not per_benchmark:
        raise ValueError("mean_over_benchmarks: no benchmarks")
    vals = list(per_benchmark.values())
    if keys is None:
        common = set(vals[0])
        for v in vals[1:]:
            common &= set(v)
        keys = [k for k in vals[0] if k in common and (k in ("avg", "mean_length", "truncation_rate")
                                                      or k.startswith("pass@"))]
    out = {}
    for key in keys:
        xs = [float(v[key]) for v in vals]
        out[key] = math.fsum(xs) / len(xs)
    return out
