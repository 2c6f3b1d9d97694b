"""pass@k / Avg@k / means against exact enumeration and hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest

from megatron_eaopd.evaluation.metrics import avg_at_n, benchmark_metrics, mean_over_benchmarks, pass_at_k


def _enumerate_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_enumerate_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_n_equals_k_is_any_correct():
    for n in (1, 4, 8):
        assert pass_at_k(n, 0, n) == 0.0
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form does not
    v = pass_at_k(1000, 3, 500)
    exact = 1 - math.comb(997, 500) / math.comb(1000, 500)
    assert v == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k(8, 1, 9)
    with pytest.raises(ValueError):
        pass_at_k(8, 9, 1)
    with pytest.raises(ValueError):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError):
        avg_at_n(4, 5)


def _recs(pattern, lengths=None, truncated=None):
    return [{"correct": bool(x), "num_tokens": (lengths or [10] * len(pattern))[i],
             "truncated": bool((truncated or [0] * len(pattern))[i])} for i, x in enumerate(pattern)]


def test_benchmark_metrics_exact():
    probs = [_recs([1, 1, 0, 0], lengths=[1, 2, 3, 4], truncated=[0, 0, 0, 1]),
             _recs([0, 0, 0, 0], lengths=[5, 5, 5, 5]),
             _recs([1, 1, 1, 1], lengths=[2, 2, 2, 2])]
    m = benchmark_metrics(probs, ks=[1, 2, 4])
    assert m["problems"] == 3 and m["n"] == 4
    assert m["avg"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert m["pass@1"] == pytest.approx(m["avg"])
    assert m["pass@2"] == pytest.approx(100 * ((1 - 1 / 6) + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(100 * 2 / 3)
    assert m["mean_length"] == pytest.approx((10 + 20 + 8) / 12)
    assert m["truncation_rate"] == pytest.approx(100 / 12)


def test_benchmark_metrics_errors():
    with pytest.raises(ValueError, match="k=5"):
        benchmark_metrics([_recs([1, 0, 0, 0])], ks=[5])
    with pytest.raises(ValueError, match="different sample counts"):
        benchmark_metrics([_recs([1, 0]), _recs([1])], ks=[1])
    with pytest.raises(ValueError, match="no problems"):
        benchmark_metrics([], ks=[1])


def test_mean_over_benchmarks_unweighted():
    a = {"problems": 500, "n": 8, "avg": 60.0, "pass@8": 80.0, "mean_length": 100.0, "truncation_rate": 0.0}
    b = {"problems": 30, "n": 8, "avg": 10.0, "pass@8": 20.0, "mean_length": 300.0, "truncation_rate": 10.0}
    m = mean_over_benchmarks({"A": a, "B": b})
    assert m == {"avg": 35.0, "pass@8": 50.0, "mean_length": 200.0, "truncation_rate": 5.0}
    with pytest.raises(ValueError):
        mean_over_benchmarks({})
